"""The losses against hand-computed numbers, and the direction their gradients push."""

from __future__ import annotations

import math

import pytest
import torch

from dlma import losses as L

# one pair: policy lp(o+) = -10, lp(o-) = -12; reference lp(o+) = -11, lp(o-) = -11
PI_C, PI_R, REF_C, REF_R = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
H = 2.0  # (-10 + 11) - (-12 + 11)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_dpo_hand_computed():
    out = L.dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1)
    assert out.losses.item() == pytest.approx(softplus(-0.1 * H), abs=1e-6)  # -log sigmoid(0.2) = 0.598139
    assert out.losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)


def test_dpo_label_smoothing_hand_computed():
    out = L.dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2), abs=1e-6)


def test_dlma_hand_computed_and_clamped():
    # logit = 0.1 * (2 - 0.2 * R); R = 5 -> 0.1, loss = -log sigmoid(0.1) = 0.644397
    out = L.dlma_loss(PI_C, PI_R, REF_C, REF_R, torch.tensor([5.0]), beta=0.1, margin_weight=0.2, margin_clip=(-40, 40))
    assert out.losses.item() == pytest.approx(0.644397, abs=1e-6)
    # R = 100 is clamped to 40: logit = 0.1 * (2 - 8) = -0.6, loss = softplus(0.6) = 1.037488
    out = L.dlma_loss(PI_C, PI_R, REF_C, REF_R, torch.tensor([100.0]), beta=0.1, margin_weight=0.2, margin_clip=(-40, 40))
    assert out.losses.item() == pytest.approx(1.037488, abs=1e-6)
    # w = 0 is DPO
    dpo = L.dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1).losses
    assert torch.allclose(L.dlma_loss(PI_C, PI_R, REF_C, REF_R, torch.tensor([7.0]), margin_weight=0.0).losses, dpo)


def test_ipo_hand_computed():
    # (h - 1/(2 beta))^2 = (2 - 5)^2 = 9
    assert L.ipo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1).losses.item() == pytest.approx(9.0)


def test_sft_hand_computed():
    assert L.sft_loss(torch.tensor([-10.0, -3.0]), torch.tensor([5, 3])).tolist() == pytest.approx([2.0, 1.0])


@pytest.mark.parametrize("name", ["dpo", "dlma", "ipo"])
def test_gradient_step_increases_chosen_over_rejected(name):
    """One gradient-descent step on the policy log-probs raises lp(o+) - lp(o-)."""
    pi_c = torch.tensor([-10.0, -20.0, -5.0], requires_grad=True)
    pi_r = torch.tensor([-12.0, -18.0, -5.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-11.0, -19.0, -6.0]), torch.tensor([-11.0, -19.0, -4.0])
    if name == "dlma":
        out = L.dlma_loss(pi_c, pi_r, ref_c, ref_r, torch.tensor([3.0, -2.0, 50.0]))
    else:
        out = getattr(L, f"{name}_loss")(pi_c, pi_r, ref_c, ref_r)
    out.losses.sum().backward()
    assert (pi_c.grad < 0).all() and (pi_r.grad > 0).all()  # descent raises o+ and lowers o-
    with torch.no_grad():
        before = pi_c - pi_r
        after = (pi_c - 0.1 * pi_c.grad) - (pi_r - 0.1 * pi_r.grad)
    assert (after > before).all()


def test_sft_gradient_raises_chosen():
    pi_c = torch.tensor([-10.0], requires_grad=True)
    L.sft_loss(pi_c, torch.tensor([4])).sum().backward()
    assert pi_c.grad.item() == pytest.approx(-0.25)


def test_listwise_hand_computed_and_two_responses_are_the_pair_losses():
    # three responses, best first; implicit rewards z = beta * (pi - ref) with w = 0
    pi, ref = torch.tensor([[-10.0, -11.0, -12.0]]), torch.tensor([[-11.0, -11.0, -11.0]])
    z = [0.1, 0.0, -0.1]
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    want = ((lse(z) - z[0]) + (lse(z[1:]) - z[1])) / 2
    got = L.listwise_loss(pi, ref, torch.tensor([[5.0, 0.0, -5.0]]), margin_weight=0.0).losses
    assert got.item() == pytest.approx(want, rel=1e-6)
    # N = 2: Plackett-Luce is Bradley-Terry, i.e. DPO (w = 0) and the dlma loss (w, clamp)
    g = torch.Generator().manual_seed(0)
    pi, ref = torch.randn(6, 2, generator=g) * 5, torch.randn(6, 2, generator=g) * 5
    s = torch.randn(6, 2, generator=g) * 40
    pl = L.listwise_loss(pi, ref, s).losses
    dl = L.dlma_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], s[:, 0] - s[:, 1]).losses
    dp = L.dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1]).losses
    assert torch.allclose(pl, dl, atol=1e-5)
    assert torch.allclose(L.listwise_loss(pi, ref, s, margin_weight=0.0).losses, dp, atol=1e-5)


def test_listwise_gradient_raises_the_ranked_order():
    """A descent step raises every response against every one ranked below it."""
    pi = torch.tensor([[-10.0, -10.0, -10.0, -10.0]], requires_grad=True)
    ref = torch.full((1, 4), -10.0)
    L.listwise_loss(pi, ref, torch.tensor([[3.0, 1.0, -1.0, -3.0]])).losses.sum().backward()
    assert pi.grad[0, 0] < 0 and pi.grad[0, -1] > 0
    assert torch.all(pi.grad[0, :-1] < pi.grad[0, 1:])  # the higher the rank, the stronger the push up


def test_kl_to_reference_is_the_kl_of_the_top_k_and_a_tail_bucket():
    """Zero where the policy is the reference, the exact KL when K covers the vocabulary, and
    otherwise the KL of the two distributions with the tokens outside the top K lumped together."""
    torch.manual_seed(0)
    ref = torch.randn(5, 11).log_softmax(-1)
    pi = (ref + 0.7 * torch.randn(5, 11)).log_softmax(-1)
    top = ref.topk(11, -1)
    exact = (ref.exp() * (ref - pi)).sum(-1)
    assert torch.allclose(L.kl_to_reference(pi, top.indices, top.values), exact, atol=1e-5)
    k = ref.topk(3, -1)
    assert torch.allclose(L.kl_to_reference(ref, k.indices, k.values), torch.zeros(5), atol=1e-5)
    got = L.kl_to_reference(pi, k.indices, k.values)
    rest = torch.ones(5, 11, dtype=torch.bool).scatter(-1, k.indices, False)
    lump = lambda d: torch.cat([d.gather(-1, k.indices), d.masked_fill(~rest, -1e9).logsumexp(-1, keepdim=True)], -1)  # noqa: E731
    coarse_ref, coarse_pi = lump(ref), lump(pi)
    assert torch.allclose(got, (coarse_ref.exp() * (coarse_ref - coarse_pi)).sum(-1), atol=1e-5)
    assert (got > 0).all() and (got <= exact + 1e-6).all()  # lumping never adds divergence
