"""The loss of a micro-batch: one forward pass over every example's responses, the registered
objective (`dlma.objectives`), then the extra terms it takes.

Each example's context is computed once and followed by its responses as branches (with
--share-context, the prefix all contexts of the micro-batch share once too, pairs packed into
rows without padding). The uncut chosen response (--rpo-whole) and the untouched model's answer
(--kl-alpha) ride as further branches of the same context, so one forward gives every sum.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import losses as L
from ..config import TrainConfig
from ..errors import DlmaError
from ..logprobs import Positions, branch_logits
from ..objectives import Objective, objective
from ..terms import nll_on
from .examples import Example


def responses(e: Example, obj: Objective) -> list[list[int]]:
    """The responses `obj` scores of example `e`, best first."""
    return {"chosen": [e.chosen], "pair": [e.chosen, e.rejected], "ranked": e.ranked}[obj.responses]


def loss_settings(cfg: TrainConfig) -> L.LossSettings:
    return L.LossSettings(beta=cfg.beta, margin_weight=cfg.margin_weight, margin_clip=tuple(cfg.margin_clip),
                          label_smoothing=cfg.label_smoothing)


def branch_sums(model, examples: Sequence[Example], branches: Sequence[Sequence[list[int]]], pad_id: int, device,
                pack: bool = True) -> tuple[torch.Tensor, Positions, torch.Tensor | None]:
    """Differentiable summed log-probs (B, N) of each example's N `branches` after its context
    (`branch_logits`), the positions computed, and, where an example carries the untouched
    model's answer (--kl-alpha), the per-example mean KL(untouched || model) along it (0 for one
    without; None when none has one): the answer rides as one more branch of the same context and
    goes through log-softmax for its distributions only."""
    n = len(branches[0])
    contexts = [e.context for e in examples]
    if not any(e.kl_answer for e in examples):
        out = branch_logits(model, contexts, branches, pad_id, device, pack=pack)
        return out.sums(), out.work, None
    out = branch_logits(model, contexts, [list(b) + [e.kl_answer or []] for e, b in zip(examples, branches)],
                        pad_id, device, pack=pack)
    zero = torch.zeros((), device=device)
    kl = torch.stack([L.kl_to_reference(out.distributions(i, n), e.kl_ref_ids.to(device), e.kl_ref_lp.to(device)).mean()
                      if e.kl_answer else zero for i, e in enumerate(examples)])
    return out.sums(range(n))[:, :n], out.work, kl


def row_tokens(e: Example, branches: Sequence[list[int]], n: int) -> int:
    """Tokens as (context, response) rows would count them, whatever the layout, so tokens/s
    compares across settings: a row per scored response, and one per extra branch it has."""
    extra = [b for b in branches[n:] if b] + ([e.kl_answer] if e.kl_answer else [])
    return sum(len(e.context) + len(b) for b in branches[:n]) + sum(len(e.context) + len(b) for b in extra)


def micro_batch_losses(model, examples: Sequence[Example], cfg: TrainConfig, pad_id: int,
                       device) -> tuple[L.PairLoss, int, Positions]:
    """Per-pair losses (and implicit rewards) of a micro-batch, every response in one forward,
    with the tokens as (context, response) rows count them and the positions computed."""
    obj = objective(cfg.loss)
    scored = [responses(e, obj) for e in examples]
    n = len(scored[0])
    if any(len(r) != n for r in scored):
        raise DlmaError(f"--loss {cfg.loss} needs the same number of candidates in every record; "
                        "generate the pair file with one --num-samples")
    whole = any(e.whole_chosen for e in examples)  # --rpo-whole: the uncut chosen response as a further branch
    branches = [r + [e.whole_chosen or []] if whole else r for e, r in zip(examples, scored)]
    sums, positions, kl = branch_sums(model, examples, branches, pad_id, device, pack=cfg.share_context)
    batch = L.LossBatch(policy=sums[:, :n], counts=torch.tensor([[len(x) for x in r] for r in scored], device=device))
    if obj.reference:
        batch.reference = torch.tensor([e.reference for e in examples], dtype=torch.float32, device=device)
    if obj.uses_reward:
        batch.reward = torch.tensor([float(e.self_reward) for e in examples], dtype=torch.float32, device=device)
    if obj.responses == "ranked":
        batch.scores = torch.tensor([e.scores for e in examples], dtype=torch.float32, device=device)
    out = obj.resolve()(batch, loss_settings(cfg))
    if obj.takes("nll"):
        add_nll(out, sums[:, 0], examples, cfg, device, sums[:, n] if whole else None)
    if obj.takes("kl"):
        add_kl(out, kl, cfg)
    return out, sum(row_tokens(e, b, n) for e, b in zip(examples, branches)), positions


def add_kl(out: L.PairLoss, kl: torch.Tensor | None, cfg: TrainConfig) -> None:
    """--kl-alpha: add kl_alpha x each pair's mean per-token KL to the untouched model's answer."""
    if kl is not None:
        out.losses = out.losses + cfg.kl_alpha * kl
        out.kl = kl.detach()


def add_nll(out: L.PairLoss, pi_c: torch.Tensor, examples: Sequence[Example], cfg: TrainConfig, device,
            whole: torch.Tensor | None = None) -> None:
    """RPO: add rpo_alpha x the chosen response's per-token NLL, on the --rpo-presets pairs only (all if empty);
    `whole`: sums over the uncut chosen responses, used where a pair has one (--rpo-whole)."""
    if cfg.rpo_alpha:
        has = [bool(e.whole_chosen) and whole is not None for e in examples]
        counts = torch.tensor([len(e.whole_chosen) if h else len(e.chosen) for e, h in zip(examples, has)], device=device)
        if any(has):
            pi_c = torch.where(torch.tensor(has, device=device), whole, pi_c)
        on = torch.tensor([nll_on(cfg, e.preset) for e in examples], device=device)
        out.losses = out.losses + cfg.rpo_alpha * on * L.sft_loss(pi_c, counts)

