"""The data order and the learning-rate schedule: both functions of (seed, epoch, step) alone.

A resumed run and a run on more processes therefore see the same pairs in every optimizer step,
and the schedule needs no state of its own in a checkpoint.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..config import TrainConfig

BUCKET_WINDOW = 16  # global batches sorted by length together


def _spread(chunk: list[int], lengths: Sequence[int], strata: Sequence[str]) -> list[int]:
    """`chunk` longest first within each stratum, the strata dealt evenly through it.

    The i-th of a stratum's c members sits at (i + 0.5) / c: consecutive slices then hold
    each stratum in proportion, and members of similar length rank, so padding stays small.
    """
    by: dict[str, list[int]] = {}
    for i in chunk:
        by.setdefault(strata[i], []).append(i)
    keyed = []
    for s, members in by.items():
        members.sort(key=lambda i: (-lengths[i], i))
        keyed += [((k + 0.5) / len(members), s, i) for k, i in enumerate(members)]
    return [i for _, _, i in sorted(keyed)]


def epoch_plan(lengths: Sequence[int], global_batch: int, micro_per_step: int, epoch: int, seed: int,
               strata: Sequence[str] | None = None) -> list[list[list[int]]]:
    """Optimizer steps of one epoch; each step is `micro_per_step` lists of example indices.

    Shuffled from (seed, epoch), length-bucketed inside windows of BUCKET_WINDOW global batches.
    Micro-batch k of a step runs on process k % world at accumulation index k // world.
    Groups with fewer pairs than micro-batches (only ever the epoch's last) are dropped.
    With `strata` (each pair's preset), every global batch holds the strata in proportion:
    sorting by length alone put 0 to 8 `harmless` pairs of 8 into a step, so steps pulled
    towards refusing and towards answering in turn and the result hung on the data order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = global_batch * BUCKET_WINDOW
    groups: list[list[int]] = []
    for s in range(0, len(perm), window):
        if strata is not None:
            chunk = _spread(perm[s: s + window], lengths, strata)
        else:
            chunk = sorted(perm[s: s + window], key=lambda i: (-lengths[i], i))
        groups += [chunk[k: k + global_batch] for k in range(0, len(chunk), global_batch)]
    groups = [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()]
    steps = []
    for grp in groups:
        if len(grp) < micro_per_step:
            continue
        q, rem = divmod(len(grp), micro_per_step)
        bounds = [0]
        for k in range(micro_per_step):
            bounds.append(bounds[-1] + q + (1 if k < rem else 0))
        steps.append([grp[bounds[k]: bounds[k + 1]] for k in range(micro_per_step)])
    return steps


def token_chunks(batch: Sequence[int], tokens: Sequence[int], budget: int) -> list[list[int]]:
    """`batch` in order, cut into runs of at most `budget` tokens (a longer pair alone); budget 0: one run."""
    if budget <= 0:
        return [list(batch)]
    out: list[list[int]] = []
    used = budget + 1
    for i in batch:
        if used + tokens[i] > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += tokens[i]
    return out


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then decay to 0."""
    warm = int(round(cfg.warmup_ratio * total))
    if step < warm:
        return cfg.lr * (step + 1) / (warm + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, total - warm)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
