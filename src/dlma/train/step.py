"""One optimizer step: forward and backward of this process's micro-batches, then the update.

The loss of each pair is summed and scaled by 1 / (pairs in the global step), so results do not
depend on how the global batch is split across processes or accumulation steps. A step whose
loss or gradient is NaN/inf is skipped: the weights never see it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import astuple, dataclass, fields
from typing import Sequence

import torch

from ..config import TrainConfig
from .examples import Example
from .objective import micro_batch_losses
from .order import token_chunks
from .runtime import BackwardStepper


@dataclass
class StepStats:
    """What a step leaves for the log, summed over its micro-batches (and, once reduced, processes)."""

    loss_sum: float = 0.0
    margin_sum: float = 0.0  # implicit reward margins, chosen - rejected
    correct: int = 0  # pairs whose margin is > 0
    pairs: int = 0
    tokens: int = 0  # as (context, response) rows count them
    positions: int = 0  # positions the model computed
    head_positions: int = 0  # of those, the ones through the output layer
    kl_sum: float = 0.0  # per-pair mean KL to the untouched model's answers (--kl-alpha)
    kl_pairs: int = 0

    def __iadd__(self, other: "StepStats") -> "StepStats":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def reduced(self, accelerator) -> "StepStats":
        """Summed over every process (one collective)."""
        if accelerator.num_processes == 1:
            return self
        total = accelerator.reduce(torch.tensor(astuple(self), dtype=torch.float64, device=accelerator.device), "sum")
        return StepStats(*(type(getattr(self, f.name))(v) for f, v in zip(fields(self), total.cpu().tolist())))

    @property
    def loss(self) -> float:
        return self.loss_sum / self.pairs


@dataclass
class StepResult:
    lr: float
    stats: StepStats
    grad_norm: torch.Tensor | None  # where gradients were clipped
    bad: bool  # a NaN/inf loss or gradient: the update was skipped
    seconds: float

    @property
    def loss(self) -> float:
        return self.stats.loss


def train_step(model, optimizer, micro_batches: Sequence[Sequence[Example]], cfg: TrainConfig, pad_id: int,
               accelerator, *, lr: float | None = None, stepper: BackwardStepper | None = None,
               params: Sequence[torch.nn.Parameter] | None = None) -> StepResult:
    """One optimizer step over the global batch `micro_batches` (micro-batch k runs on process
    k % world, accumulation index k // world): forward, backward, skip-or-update.

    `stepper` (one process, no accumulation or clipping) has already updated every weight inside
    backward; `params` are the trainable parameters clipping measures (default: all).
    """
    world = accelerator.num_processes
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    t0 = time.perf_counter()
    stats, grad_norm, bad = StepStats(), None, False
    # sum / (pairs in the global step), times the factors that DDP averaging and accelerate's
    # division by grad_accum take out again
    scale = world * cfg.grad_accum / sum(len(m) for m in micro_batches)
    for k in range(accelerator.process_index, len(micro_batches), world):
        with accelerator.accumulate(model):
            micro = micro_batches[k]
            chunks = token_chunks(range(len(micro)), [e.tokens for e in micro], cfg.micro_tokens)
            for j, chunk in enumerate(chunks):
                # passes before a micro-batch's last add up gradients locally; the last one reduces them
                with accelerator.no_sync(model) if j < len(chunks) - 1 else contextlib.nullcontext():
                    row, finite = backward_pass(model, [micro[i] for i in chunk], cfg, pad_id, accelerator, scale,
                                                skip_nonfinite=stepper is not None)
                stats += row
                bad |= not finite
            if stepper is not None:
                bad |= stepper.take_nonfinite() > 0
            else:  # else every weight was already updated inside backward
                if accelerator.sync_gradients:
                    bad = nonfinite_gradients(model, accelerator, bad)
                    if not bad and cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params if params is not None else model.parameters(),
                                                                cfg.max_grad_norm)
                    if not bad:
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return StepResult(optimizer.param_groups[0]["lr"], stats.reduced(accelerator), grad_norm, bad,
                      time.perf_counter() - t0)


def backward_pass(model, examples: Sequence[Example], cfg: TrainConfig, pad_id: int, accelerator, scale: float,
                  skip_nonfinite: bool = False) -> tuple[StepStats, bool]:
    """Forward and backward of `examples`: their stats and whether their loss was finite.

    skip_nonfinite: updates happen inside backward, which must not see a non-finite loss at all."""
    res, ntok, positions = micro_batch_losses(model, examples, cfg, pad_id, accelerator.device)
    total = res.losses.sum()
    finite = bool(torch.isfinite(total))
    if finite or not skip_nonfinite:
        accelerator.backward(total * scale)
    margin = (res.chosen_rewards - res.rejected_rewards).detach()
    row = StepStats(loss_sum=float(res.losses.detach().sum()), margin_sum=float(margin.sum()),
                    correct=int((margin > 0).sum()), pairs=len(examples), tokens=ntok, positions=positions.body,
                    head_positions=positions.head)
    if res.kl is not None:
        row.kl_sum, row.kl_pairs = float(res.kl.sum()), sum(bool(e.kl_answer) for e in examples)
    return row, finite


def nonfinite_gradients(model, accelerator, bad: bool) -> bool:
    """Whether this step must be skipped: a NaN/inf loss here, or a NaN/inf gradient on any process."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not bad and grads:  # one host read for the whole model, not one per tensor
        bad = not bool(torch.stack([torch.isfinite(g).all().to(accelerator.device) for g in grads]).all())
    if accelerator.num_processes > 1:  # every process must make the same choice (FSDP shards differ)
        flag = torch.tensor([float(bad)], device=accelerator.device)
        bad = bool(accelerator.reduce(flag, "sum").item() > 0)
    return bad
