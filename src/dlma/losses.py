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

Label smoothing eps (conservative DPO, Mitchell 2023) assumes a label is flipped with
probability eps: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("dlma", "dpo", "ipo", "sft")


@dataclass
class PairLoss:
    losses: torch.Tensor            # (B,) per-pair loss
    chosen_rewards: torch.Tensor    # (B,) beta * (lp_pi - lp_ref) of o+, detached
    rejected_rewards: torch.Tensor  # (B,) same for o-, detached


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
    lo, hi = margin_clip
    shift = margin_weight * torch.as_tensor(self_reward, dtype=h.dtype, device=h.device).clamp(lo, hi)
    return PairLoss(sigmoid_loss(beta * (h - shift), label_smoothing), *_rewards(beta, pi_c, pi_r, ref_c, ref_r))


def ipo_loss(pi_c, pi_r, ref_c, ref_r, *, beta: float = 0.1) -> PairLoss:
    """IPO: squared distance of h from 1 / (2 beta); bounded, so it does not over-fit deterministic preferences."""
    h = log_ratio_margin(pi_c, pi_r, ref_c, ref_r)
    return PairLoss((h - 1 / (2 * beta)) ** 2, *_rewards(beta, pi_c, pi_r, ref_c, ref_r))


def sft_loss(pi_c: torch.Tensor, counts_c: torch.Tensor) -> torch.Tensor:
    """Per-pair mean negative log-likelihood of the chosen response (context distillation)."""
    return -pi_c / counts_c.clamp(min=1).to(pi_c.dtype)
