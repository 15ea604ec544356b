"""Preference losses as pure functions: summed log-probs in, per-pair losses out.

Every pairwise loss takes the policy's and the reference's summed response log-probs of
the chosen and rejected responses (float tensors of shape (B,)) and returns a `PairLoss`
with the per-pair loss and the implicit rewards beta * (lp_policy - lp_ref) of each side,
so the trainer can log the reward margin and accuracy. Reduction is the caller's job: it
knows the global batch size across processes and accumulation steps.

    h = [lp_pi(o+) - lp_ref(o+)] - [lp_pi(o-) - lp_ref(o-)]
    dpo:  -log sigmoid(beta * h)                                 (Rafailov et al., 2023)
    dlma: -log sigmoid(beta * (h - w * clamp(R, lo, hi)))        (Liu et al., 2024)
    ipo:  (h - 1 / (2 * beta))^2                                 (Azar et al., 2023)
    sft:  -lp_pi(o+) / |o+|                                      (context distillation)
    listwise: Plackett-Luce over N responses ranked by their self-reward log-ratio
          s = lp(o | p+) - lp(o | p-) (Rafailov et al., 2023, App. A.3; Liu et al., 2024b, LiPO),
          each logit z_i = beta * (lp_pi(o_i) - lp_ref(o_i) - w * clamp(s_i - mean s, lo/2, hi/2)):
          mean over k < N of [logsumexp(z_k..z_N) - z_k]. For N = 2 it is the dlma loss.

    kl:   KL(pi_ref || pi) per token on the untouched model's own greedy answer to a prompt,
          over the reference's top-K tokens and one bucket for the rest (a retain term,
          as in unlearning's KL on a retain set; here: answer harmless prompts as before)

Label smoothing eps (conservative DPO, Mitchell 2023) assumes a label is flipped with
probability eps: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z).

The trainer calls each objective (`dlma.objectives`) through one signature, `(LossBatch,
LossSettings) -> PairLoss`: the functions at the end of this file, each a line around the
tensor-level loss above it. A new objective is one more such function and one registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLoss:
    losses: torch.Tensor            # (B,) per-pair loss
    chosen_rewards: torch.Tensor    # (B,) beta * (lp_pi - lp_ref) of o+, detached
    rejected_rewards: torch.Tensor  # (B,) same for o-, detached
    kl: torch.Tensor | None = None  # (B,) the KL term of each pair (0 where it has none), detached


def _rewards(beta: float, pi_c, pi_r, ref_c, ref_r) -> tuple[torch.Tensor, torch.Tensor]:
    return (beta * (pi_c - ref_c)).detach(), (beta * (pi_r - ref_r)).detach()


def log_ratio_margin(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor) -> torch.Tensor:
    """h: how much more the policy prefers o+ over o- than the reference does."""
    return (pi_c - ref_c) - (pi_r - ref_r)


def sigmoid_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sigmoid(z), optionally label-smoothed."""
    if label_smoothing:
        return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return -F.logsigmoid(logits)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PairLoss:
    """DPO: -log sigmoid(beta * h)."""
    h = log_ratio_margin(pi_c, pi_r, ref_c, ref_r)
    return PairLoss(sigmoid_loss(beta * h, label_smoothing), *_rewards(beta, pi_c, pi_r, ref_c, ref_r))


def dlma_loss(pi_c, pi_r, ref_c, ref_r, self_reward, *, beta: float = 0.1, margin_weight: float = 0.2,
              margin_clip: tuple[float, float] = (-40.0, 40.0), label_smoothing: float = 0.0) -> PairLoss:
    """Self-rewarding DPO: the DPO logit shifted by w * clamp(R, lo, hi).

    A pair the model is confident about (large R) must be separated by a larger implicit
    reward gap before its loss flattens; an inverted pair (R < 0) pushes less.
    """
    h = log_ratio_margin(pi_c, pi_r, ref_c, ref_r)
    shift = reward_shift(self_reward, margin_weight, margin_clip, like=h)
    return PairLoss(sigmoid_loss(beta * (h - shift), label_smoothing), *_rewards(beta, pi_c, pi_r, ref_c, ref_r))


def reward_shift(self_reward, margin_weight: float, margin_clip: tuple[float, float], *, like: torch.Tensor) -> torch.Tensor:
    """w * clamp(R, lo, hi), in `like`'s dtype and device: the extra log-ratio gap DLMA asks of each pair
    (dlma_loss subtracts it inside the logit; the TRL integration adds it to the chosen reference)."""
    lo, hi = margin_clip
    return margin_weight * torch.as_tensor(self_reward, dtype=like.dtype, device=like.device).clamp(lo, hi)


def ipo_loss(pi_c, pi_r, ref_c, ref_r, *, beta: float = 0.1) -> PairLoss:
    """IPO: squared distance of h from 1 / (2 beta); bounded, so it does not over-fit deterministic preferences."""
    h = log_ratio_margin(pi_c, pi_r, ref_c, ref_r)
    return PairLoss((h - 1 / (2 * beta)) ** 2, *_rewards(beta, pi_c, pi_r, ref_c, ref_r))


def sft_loss(pi_c: torch.Tensor, counts_c: torch.Tensor) -> torch.Tensor:
    """Per-pair mean negative log-likelihood of the chosen response (context distillation)."""
    return -pi_c / counts_c.clamp(min=1).to(pi_c.dtype)


def listwise_loss(pi: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, *, beta: float = 0.1,
                  margin_weight: float = 0.2, margin_clip: tuple[float, float] = (-40.0, 40.0)) -> PairLoss:
    """Plackett-Luce loss of a ranked list per row (pi, ref, scores: (B, N), best first).

    The probability of the whole ranking, not of one pair: every response of a prompt's
    best-of-K sample teaches something, where a pair keeps two of 2K. The self-reward
    enters twice, as in the dlma loss: it orders the list and, through the shift, asks a
    wider gap between responses it tells further apart. Averaged over the N - 1 choices so
    a list weighs like one pair and a learning rate chosen for pairs keeps its meaning.
    chosen/rejected rewards are those of the first and last response.
    """
    lo, hi = margin_clip
    s = scores.to(pi.dtype)
    shift = margin_weight * (s - s.mean(-1, keepdim=True)).clamp(lo / 2, hi / 2)
    z = beta * (pi - ref - shift)
    # logsumexp over each suffix z_k..z_N: a reversed cumulative logsumexp
    tail = torch.logcumsumexp(z.flip(-1), -1).flip(-1)
    losses = (tail - z)[:, :-1].mean(-1)
    return PairLoss(losses, *_rewards(beta, pi[:, 0], pi[:, -1], ref[:, 0], ref[:, -1]))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, kept finite where x reaches 0 (all mass in the top K)."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def kl_to_reference(pi_logprobs: torch.Tensor, ref_ids: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || pi) (T,) over the reference's top-K tokens and a tail bucket.

    pi_logprobs: (T, V) the policy's log-softmax; ref_ids, ref_logprobs: (T, K) the reference's
    top-K tokens and their log-probs. Lumping the tokens outside the top K into one bucket on
    both sides keeps it a true KL divergence (>= 0, 0 exactly when the two agree on the top K),
    and K numbers per position are all the reference has to keep.
    """
    ref_lp = ref_logprobs.to(pi_logprobs.dtype)
    pi_top = pi_logprobs.gather(-1, ref_ids.long())
    ref_tail = _log1mexp(torch.logsumexp(ref_lp, -1))
    pi_tail = _log1mexp(torch.logsumexp(pi_top, -1))
    return (ref_lp.exp() * (ref_lp - pi_top)).sum(-1) + ref_tail.exp() * (ref_tail - pi_tail)


# -- the objectives' common signature ----------------------------------------------
@dataclass
class LossBatch:
    """What an objective sees of a micro-batch: N responses per example (chosen first, rejected
    last; N = 1 for `chosen`, 2 for `pair`, 2K for `ranked` objectives)."""

    policy: torch.Tensor  # (B, N) summed log-probs under the model being trained (differentiable)
    counts: torch.Tensor  # (B, N) response lengths in tokens
    reference: torch.Tensor | None = None  # (B, N) summed log-probs under the reference
    reward: torch.Tensor | None = None  # (B,) self-reward R, for objectives that use it
    scores: torch.Tensor | None = None  # (B, N) each ranked response's self-reward log-ratio, best first


@dataclass(frozen=True)
class LossSettings:
    beta: float = 0.1
    margin_weight: float = 0.2
    margin_clip: tuple[float, float] = (-40.0, 40.0)
    label_smoothing: float = 0.0


def _pair(b: LossBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    assert b.reference is not None
    return b.policy[:, 0], b.policy[:, -1], b.reference[:, 0], b.reference[:, -1]


def dlma(b: LossBatch, s: LossSettings) -> PairLoss:
    return dlma_loss(*_pair(b), b.reward, beta=s.beta, margin_weight=s.margin_weight, margin_clip=s.margin_clip,
                     label_smoothing=s.label_smoothing)


def dpo(b: LossBatch, s: LossSettings) -> PairLoss:
    return dpo_loss(*_pair(b), beta=s.beta, label_smoothing=s.label_smoothing)


def ipo(b: LossBatch, s: LossSettings) -> PairLoss:
    return ipo_loss(*_pair(b), beta=s.beta)


def sft(b: LossBatch, s: LossSettings) -> PairLoss:
    zero = torch.zeros(b.policy.shape[0], device=b.policy.device)
    return PairLoss(sft_loss(b.policy[:, 0], b.counts[:, 0]), zero, zero)


def listwise(b: LossBatch, s: LossSettings) -> PairLoss:
    assert b.reference is not None and b.scores is not None
    return listwise_loss(b.policy, b.reference, b.scores, beta=s.beta, margin_weight=s.margin_weight,
                         margin_clip=s.margin_clip)
