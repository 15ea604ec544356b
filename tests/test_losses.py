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
