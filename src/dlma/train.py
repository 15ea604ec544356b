"""The training loop: scored pairs -> an aligned Hugging Face model directory.

One loop for every objective in `losses` and every scale: a single CPU, one GPU, or many
processes under `accelerate launch` (DDP, FSDP, DeepSpeed ZeRO). What it does, in order:

1. read the pairs, flip (`--flip-negative`) and filter (`--min-reward`) them by the
   self-reward R, and render token ids through `prompts.Renderer` (bare context);
2. reference log-probs: from the scored file when every pair carries them, else computed
   once from the initial weights (and saved in the output directory, so a resumed run
   reuses them). No reference model is held while training; with --kl-alpha, also the
   initial weights' greedy answers to the --kl-presets pairs' prompts and their top-K
   next-token log-probs, the target of the KL term (cached the same way);
3. a deterministic plan of optimizer steps: shuffled per epoch from --seed, length-bucketed
   inside windows of 16 global batches, every global batch split into
   processes x grad_accum micro-batches. The plan depends only on (seed, epoch, global
   batch), so a resumed run and a run on more processes see the same pairs per step;
4. per micro-batch, chosen and rejected responses in ONE forward pass (by default each
   context computed once and the prefix all contexts share, the chat template's system turn,
   once per micro-batch, pairs packed into rows without padding: `branch_logits`), the loss of each
   pair, summed and scaled by 1 / (pairs in the global step): results do not depend on how
   the global batch is split across processes or accumulation steps;
5. AdamW with linear warm-up and cosine/linear decay (lr is a function of the step, so
   resume needs no scheduler state), resumable checkpoints every --save-steps, a
   metrics.jsonl line per step, and the final model + tokenizer in the output directory.

`train_model` reads in that order: `_setup` (1-3, and a checkpoint to resume), then per step
`_train_step` (4), `_account` and `_Log` (its metrics line), a checkpoint; `_finish` saves.

Memory: float32 master weights and AdamW moments are the fixed cost. On top of it, where
exact (one process, no accumulation, no clipping), each weight is updated inside the
backward pass and its gradient freed at once (`BackwardStepper`); autocast keeps no cache
of low-precision weight copies, so with --gradient-checkpointing only the layer being
recomputed holds them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from . import losses as L
from .config import KL_LOSSES, PAIR_LOSSES, ModelConfig, TrainConfig
from .data import read_pairs, replacing, write_json, write_text
from .errors import DlmaError
from .logprobs import Positions, branch_logits, collate, score_sequences, sequence_logprobs
from .machine import forward_flops

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from .selection import Selector

SUMMARY = "train_summary.json"
REFERENCE = "reference_logprobs.json"
KL_REFERENCE = "kl_reference.pt"
KL_TOP_K = 20  # reference tokens kept per answer position; the rest are one bucket (losses.kl_to_reference)
KL_BATCH = 64  # answers decoded together when the untouched model's answers are made
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"
BUCKET_WINDOW = 16  # global batches sorted by length together
# Fields that may change between a run and its resume without changing the result.
RESUME_FREE = ("save_steps", "save_total_limit", "log_steps", "report_to", "step_in_backward", "torch_compile")
# Steps whose loss or gradient is NaN/inf are skipped (the weights never see them); this many
# in a row stop training with an error.
MAX_NONFINITE_STEPS = 3


@dataclass
class Example:
    """One pair as token ids, with what the loss needs besides the policy."""

    id: str
    context: list[int]
    chosen: list[int]
    rejected: list[int]
    self_reward: float | None
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    preset: str | None = None
    # listwise: the responses ranked between chosen (best) and rejected (worst), their
    # reference log-probs, and the self-reward log-ratio of every response, best first
    middle: list[list[int]] = field(default_factory=list)
    ref_middle: list[float] | None = None
    scores: list[float] | None = None
    whole_chosen: list[int] | None = None  # the uncut chosen response, for --rpo-whole's NLL term
    # --kl-alpha: the untouched model's greedy answer to this prompt, and its top-K next-token
    # ids and log-probs (K per answer token) along it
    kl_answer: list[int] | None = None
    kl_ref_ids: torch.Tensor | None = None
    kl_ref_lp: torch.Tensor | None = None

    @property
    def length(self) -> int:  # padded length of this pair's row in a batch
        return len(self.context) + max(len(self.chosen), len(self.rejected))

    @property
    def tokens(self) -> int:  # what the packed layout computes for it: its context once, every response
        return (len(self.context) + len(self.chosen) + len(self.rejected) + sum(map(len, self.middle))
                + len(self.whole_chosen or []) + len(self.kl_answer or []))


# -- pairs -> examples ---------------------------------------------------------
def _preset_normalised(pairs: list[dict]) -> list[dict]:
    """R rescaled per preset to a common median |R| (--reward-norm preset)."""
    by: dict[str, list[float]] = {}
    for rec in pairs:
        by.setdefault(str(rec.get("preset")), []).append(abs(float(rec["self_reward"])))
    overall = statistics.median(v for vs in by.values() for v in vs) if pairs else 0.0
    scale = {k: (overall / statistics.median(vs) if statistics.median(vs) > 0 else 1.0) for k, vs in by.items()}
    return [dict(rec, self_reward=float(rec["self_reward"]) * scale[str(rec.get("preset"))],
                 self_reward_raw=rec["self_reward"]) for rec in pairs]


def select_pairs(pairs: list[dict], cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Flip pairs with R < 0 (if asked), rescale R per preset (if asked), drop pairs with
    R < --min-reward, and for the ablation permute R across the pairs kept."""
    needs_r = (cfg.loss == "dlma" or cfg.min_reward is not None or cfg.flip_negative
               or cfg.reward_norm != "none" or cfg.shuffle_reward)
    if needs_r:
        for rec in pairs:
            if not isinstance(rec.get("self_reward"), (int, float)):
                raise DlmaError(f"pair {rec.get('id')!r} has no numeric `self_reward`, which --loss {cfg.loss}"
                                f"{' / --min-reward' if cfg.min_reward is not None else ''}"
                                f"{' / --flip-negative' if cfg.flip_negative else ''}"
                                f"{' / --reward-norm' if cfg.reward_norm != 'none' else ''}"
                                f"{' / --shuffle-reward' if cfg.shuffle_reward else ''} needs; run `dlma score` first")
    out, flipped, filtered = [], 0, 0
    seen = []
    for rec in pairs:
        r = rec.get("self_reward")
        if cfg.flip_negative and r < 0:
            rec = dict(rec, chosen=rec["rejected"], rejected=rec["chosen"], self_reward=-r,
                       chosen_truncated=rec.get("rejected_truncated", False),
                       rejected_truncated=rec.get("chosen_truncated", False),
                       ref_lp_chosen=rec.get("ref_lp_rejected"), ref_lp_rejected=rec.get("ref_lp_chosen"), flipped=True)
            r = -r
            flipped += 1
        seen.append(rec)
    if cfg.reward_norm == "preset":
        seen = _preset_normalised(seen)
    for rec in seen:
        if cfg.min_reward is not None and rec["self_reward"] < cfg.min_reward:
            filtered += 1
            continue
        out.append(rec)
    if cfg.shuffle_reward and out:
        perm = torch.randperm(len(out), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        out = [dict(rec, self_reward=out[j]["self_reward"]) for rec, j in zip(out, perm)]
    return out, {"pairs_read": len(pairs), "pairs_flipped": flipped, "pairs_filtered": filtered, "pairs_used": len(out)}


def _ranked(rec: dict, renderer, response_tokens: int | None = None) -> dict:
    """A best-of-K record's 2K responses ranked by their self-reward log-ratio, best first."""
    c = rec.get("candidates") or {}
    texts, cut = c.get("texts"), c.get("truncated")
    ratios = list(c.get("chosen_log_ratio") or []) + list(c.get("rejected_log_ratio") or [])
    if not texts or len(texts) != len(ratios) or len(texts) < 2:
        raise DlmaError(f"pair {rec.get('id')!r} has no ranked candidates, which --loss listwise needs; "
                        "generate with --num-samples K (K >= 2)")
    order = sorted(range(len(texts)), key=lambda i: (-ratios[i], i))
    ids = [renderer.response_ids(texts[i], bool(cut[i]), first=response_tokens) for i in order]
    return {"chosen": ids[0], "rejected": ids[-1], "middle": ids[1:-1], "scores": [float(ratios[i]) for i in order]}


def build_examples(pairs: list[dict], renderer, listwise: bool = False, response_tokens: int | None = None,
                   whole_chosen: Callable[[dict], bool] | None = None) -> list[Example]:
    """Token ids of every pair; with `response_tokens` each response is cut to its opening, and
    the reference log-probs are those the scorer made for the same cut (`dlma score
    --response-tokens`), else left for the trainer to compute. whole_chosen(record): keep that
    pair's uncut chosen response too (--rpo-whole), where the cut shortened it."""
    out = []
    for rec in pairs:
        if listwise:  # the reference of every ranked response is computed by the trainer
            out.append(Example(id=str(rec["id"]), context=renderer.context_ids(rec["prompt"], "bare"),
                               self_reward=rec.get("self_reward"), preset=rec.get("preset"),
                               **_ranked(rec, renderer, response_tokens)))
            continue
        if response_tokens is None:
            ref_c, ref_r = rec.get("ref_lp_chosen"), rec.get("ref_lp_rejected")
        elif rec.get("ref_first_tokens") == response_tokens:
            ref_c, ref_r = rec.get("ref_lp_chosen_first"), rec.get("ref_lp_rejected_first")
        else:
            ref_c = ref_r = None
        out.append(Example(
            id=str(rec["id"]),
            context=renderer.context_ids(rec["prompt"], "bare"),
            chosen=renderer.response_ids(rec["chosen"], bool(rec.get("chosen_truncated", False)), first=response_tokens),
            rejected=renderer.response_ids(rec["rejected"], bool(rec.get("rejected_truncated", False)), first=response_tokens),
            self_reward=rec.get("self_reward"),
            ref_chosen=float(ref_c) if isinstance(ref_c, (int, float)) else None,
            ref_rejected=float(ref_r) if isinstance(ref_r, (int, float)) else None,
            preset=rec.get("preset"),
        ))
        e = out[-1]
        if whole_chosen is not None and response_tokens is not None and whole_chosen(rec):
            whole = renderer.response_ids(rec["chosen"], bool(rec.get("chosen_truncated", False)))
            e.whole_chosen = whole if len(whole) > len(e.chosen) else None
    return out


# -- the data order ------------------------------------------------------------
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


# -- the loss of a micro-batch ---------------------------------------------------
def shared_context_logprobs(model, examples: Sequence[Example], pad_id: int, device
                            ) -> tuple[torch.Tensor, torch.Tensor, Positions, torch.Tensor | None, torch.Tensor | None]:
    """Differentiable (chosen sums, rejected sums, positions computed, uncut chosen sums or None,
    per-pair mean KL to the untouched model's answer or None): each pair's context once, the
    prefix all the micro-batch's contexts share once (`branch_logits`); a pair's uncut chosen
    response (--rpo-whole) and the untouched model's answer (--kl-alpha) are further branches."""
    extra = any(e.whole_chosen for e in examples)
    branches = [[e.chosen, e.rejected] + ([e.whole_chosen or []] if extra else []) for e in examples]
    sums, positions, kl = _branches_with_kl(model, examples, branches, pad_id, device)
    return sums[:, 0], sums[:, 1], positions, (sums[:, 2] if extra else None), kl


def _branches_with_kl(model, examples: Sequence[Example], branches: Sequence[Sequence[list[int]]], pad_id: int,
                     device) -> tuple[torch.Tensor, Positions, torch.Tensor | None]:
    """Differentiable summed log-probs (B, N) of each example's N `branches` after its context
    (`branch_logits`), the positions computed, and, where an example carries the untouched
    model's answer (--kl-alpha), the per-example mean KL(untouched || model) along it (0 for one
    without; None when none has one): the answer rides as one more branch of the same context and
    goes through log-softmax for its distributions only. Every loss with the KL term uses this."""
    n = len(branches[0])
    if not any(e.kl_answer for e in examples):
        out = branch_logits(model, [e.context for e in examples], branches, pad_id, device)
        return out.sums(), out.work, None
    out = branch_logits(model, [e.context for e in examples], [list(b) + [e.kl_answer or []] for e, b in zip(examples, branches)],
                        pad_id, device)
    zero = torch.zeros((), device=device)
    kl = torch.stack([L.kl_to_reference(out.distributions(i, n), e.kl_ref_ids.to(device), e.kl_ref_lp.to(device)).mean()
                      if e.kl_answer else zero for i, e in enumerate(examples)])
    return out.sums(range(n))[:, :n], out.work, kl


def _kl_row_tokens(e: Example) -> int:
    """Tokens of the KL branch as a (context, answer) row counts them: tokens/s compares across layouts."""
    return len(e.context) + len(e.kl_answer) if e.kl_answer else 0


def micro_batch_losses(model, examples: Sequence[Example], cfg: TrainConfig, pad_id: int,
                       device) -> tuple[L.PairLoss, int, Positions]:
    """Per-pair losses (and implicit rewards) of a micro-batch, chosen and rejected in one forward,
    with the tokens as two (context, response) rows count them and the positions computed."""
    ctx = [e.context for e in examples]
    n = len(examples)
    if cfg.loss == "sft":
        batch = collate(ctx, [e.chosen for e in examples], pad_id).to(device)
        sums, counts = sequence_logprobs(model, batch)
        zero = torch.zeros(n, device=device)
        return (L.PairLoss(L.sft_loss(sums, counts), zero, zero), batch.num_tokens,
                Positions(batch.num_tokens, int(counts.sum())))
    if cfg.loss == "listwise":
        return _listwise_losses(model, examples, cfg, pad_id, device)
    # tokens as two (context, response) rows count them, whatever the layout: tokens/s compares across settings
    ntok = sum(2 * len(e.context) + len(e.chosen) + len(e.rejected)
               + (len(e.context) + len(e.whole_chosen) if e.whole_chosen else 0)
               + _kl_row_tokens(e) for e in examples)
    whole = kl = None
    if cfg.share_context:
        pi_c, pi_r, positions, whole, kl = shared_context_logprobs(model, examples, pad_id, device)
    else:
        positions = Positions(ntok, sum(len(e.chosen) + len(e.rejected) for e in examples))
        batch = collate(ctx + ctx, [e.chosen for e in examples] + [e.rejected for e in examples], pad_id).to(device)
        sums, _ = sequence_logprobs(model, batch)
        pi_c, pi_r = sums[:n], sums[n:]
    ref_c = torch.tensor([e.ref_chosen for e in examples], dtype=torch.float32, device=device)
    ref_r = torch.tensor([e.ref_rejected for e in examples], dtype=torch.float32, device=device)
    if cfg.loss == "dlma":
        r = torch.tensor([float(e.self_reward) for e in examples], dtype=torch.float32, device=device)
        out = L.dlma_loss(pi_c, pi_r, ref_c, ref_r, r, beta=cfg.beta, margin_weight=cfg.margin_weight,
                          margin_clip=tuple(cfg.margin_clip), label_smoothing=cfg.label_smoothing)
    elif cfg.loss == "dpo":
        out = L.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    else:
        out = L.ipo_loss(pi_c, pi_r, ref_c, ref_r, beta=cfg.beta)
    _add_nll(out, pi_c, examples, cfg, device, whole)
    _add_kl(out, kl, cfg)
    return out, ntok, positions


def _listwise_losses(model, examples: Sequence[Example], cfg: TrainConfig, pad_id: int,
                     device) -> tuple[L.PairLoss, int, Positions]:
    ranked = [[e.chosen, *e.middle, e.rejected] for e in examples]
    if len({len(r) for r in ranked}) > 1:
        raise DlmaError("--loss listwise needs the same number of candidates in every record; "
                        "generate the pair file with one --num-samples")
    ntok = sum(len(e.context) * len(r) + sum(map(len, r)) + _kl_row_tokens(e) for e, r in zip(examples, ranked))
    kl, N = None, len(ranked[0])
    if cfg.share_context:
        pi, positions, kl = _branches_with_kl(model, examples, ranked, pad_id, device)
    else:
        positions = Positions(ntok, sum(sum(map(len, r)) for r in ranked))
        batch = collate([e.context for e in examples for _ in range(N)], [r for rs in ranked for r in rs], pad_id).to(device)
        pi = sequence_logprobs(model, batch)[0].view(len(examples), N)
    ref = torch.tensor([[e.ref_chosen, *e.ref_middle, e.ref_rejected] for e in examples], dtype=torch.float32, device=device)
    scores = torch.tensor([e.scores for e in examples], dtype=torch.float32, device=device)
    out = L.listwise_loss(pi, ref, scores, beta=cfg.beta, margin_weight=cfg.margin_weight,
                          margin_clip=tuple(cfg.margin_clip))
    _add_nll(out, pi[:, 0], examples, cfg, device)
    _add_kl(out, kl, cfg)
    return out, ntok, positions


def _add_kl(out: L.PairLoss, kl: torch.Tensor | None, cfg: TrainConfig) -> None:
    if kl is not None:
        out.losses = out.losses + cfg.kl_alpha * kl
        out.kl = kl.detach()


def _rpo_whole(cfg: TrainConfig) -> bool:
    """Whether pairs carry their whole chosen response: the NLL term is on and a pair loss uses it."""
    return cfg.rpo_whole and cfg.rpo_alpha > 0 and cfg.response_tokens is not None and cfg.loss in PAIR_LOSSES


def _nll_on(cfg: TrainConfig, preset: str | None) -> bool:
    return not cfg.rpo_presets or preset in cfg.rpo_presets


def _kl_on(cfg: TrainConfig, preset: str | None) -> bool:
    return not cfg.kl_presets or preset in cfg.kl_presets


def _check_presets_named(pairs: list[dict], data: str, flag: str, named: list[str], term: str,
                         on: Callable[[str | None], bool]) -> None:
    """A term limited to presets (`on`: the term's own test) that none of the pairs has would
    silently be off: say so instead."""
    if named and not any(on(rec.get("preset")) for rec in pairs):
        have = sorted({str(rec.get("preset")) for rec in pairs})
        raise DlmaError(f"{flag} {','.join(named)} names no preset of the pairs in {data} (they have: "
                        f"{', '.join(have)}), so the {term} term would be off; name one of theirs")


def _add_nll(out: L.PairLoss, pi_c: torch.Tensor, examples: Sequence[Example], cfg: TrainConfig, device,
             whole: torch.Tensor | None = None) -> None:
    """RPO: add rpo_alpha x the chosen response's per-token NLL, on the --rpo-presets pairs only (all if empty);
    `whole`: sums over the uncut chosen responses, used where a pair has one (--rpo-whole)."""
    if cfg.rpo_alpha:
        has = [bool(e.whole_chosen) and whole is not None for e in examples]
        counts = torch.tensor([len(e.whole_chosen) if h else len(e.chosen) for e, h in zip(examples, has)], device=device)
        if any(has):
            pi_c = torch.where(torch.tensor(has, device=device), whole, pi_c)
        on = torch.tensor([_nll_on(cfg, e.preset) for e in examples], device=device)
        out.losses = out.losses + cfg.rpo_alpha * on * L.sft_loss(pi_c, counts)


# -- helpers -------------------------------------------------------------------
def validate(cfg: TrainConfig) -> None:
    if cfg.loss not in L.LOSSES:
        raise DlmaError(f"--loss must be one of {', '.join(L.LOSSES)}, got {cfg.loss!r}")
    if cfg.lr_schedule not in ("cosine", "linear", "constant"):
        raise DlmaError(f"--lr-schedule must be cosine, linear or constant, got {cfg.lr_schedule!r}")
    if cfg.mixed_precision not in ("auto", "bf16", "fp16", "no"):
        raise DlmaError(f"--mixed-precision must be auto, bf16, fp16 or no, got {cfg.mixed_precision!r}")
    if cfg.step_in_backward not in ("auto", "on", "off"):
        raise DlmaError(f"--step-in-backward must be auto, on or off, got {cfg.step_in_backward!r}")
    if cfg.rpo_whole and cfg.rpo_alpha and (not cfg.share_context or cfg.loss == "listwise"):
        raise DlmaError("--rpo-whole needs --share-context (each whole response is a third branch of its pair's "
                        "context) and a pair loss, not listwise")
    if cfg.kl_alpha and (not cfg.share_context or cfg.loss not in KL_LOSSES):
        raise DlmaError("--kl-alpha needs --share-context (the untouched model's answer is a further branch of its "
                        f"pair's context) and a loss over sampled responses ({', '.join(KL_LOSSES)})")
    if cfg.step_in_backward == "on" and (cfg.grad_accum > 1 or cfg.max_grad_norm > 0 or cfg.micro_tokens > 0):
        raise DlmaError("--step-in-backward on is exact only with --grad-accum 1, --max-grad-norm 0 and --micro-tokens 0 "
                        "(clipping needs the global norm of every gradient first; passes add up gradients)")


def _resume_key(cfg: TrainConfig, model_cfg: ModelConfig, data: str, world: int) -> dict:
    key = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    key["margin_clip"] = list(cfg.margin_clip)
    return {"train": key, "model": asdict(model_cfg), "data": os.path.abspath(data),
            "global_batch": cfg.batch_size * cfg.grad_accum * world}


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (its trainer_state.json is written last)."""
    done = [p for p in (out / "checkpoints").glob("step-*") if (p / STATE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _mixed_precision(cfg: TrainConfig, model_cfg: ModelConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    from .models import bf16_supported, resolve_device

    dev = resolve_device(model_cfg.device)
    # CPUs train in float32 for the reason resolve_dtype gives: the same numbers on every CPU.
    return "bf16" if dev.type != "cpu" and bf16_supported(dev) else "no"


def _stale_reference(pairs: list[dict], model_cfg: ModelConfig) -> str | None:
    """Why the scored file's reference log-probs don't fit this training, or None.

    A reference from another model or precision leaves the implicit reward off zero at step
    0, a bias the loss then trains on; such files are recomputed from the initial weights.
    Files without `ref_from` (older, or written by other tools) are trusted as before.
    """
    want = {"model": model_cfg.model, "dtype": str(_weights_dtype(model_cfg)).replace("torch.", "")}
    for rec in pairs:
        made = rec.get("ref_from")
        if isinstance(made, dict) and "ref_lp_chosen" in rec:
            diff = [f"{k} {made.get(k)!r}" for k in want if made.get(k) != want[k]]
            if diff:
                return f"with {', '.join(diff)}, not {', '.join(f'{k} {want[k]!r}' for k in want)}"
    return None


def _weights_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """Float32 master weights unless a low-precision dtype was asked for explicitly."""
    from .models import DTYPES

    if model_cfg.dtype == "auto":
        return torch.float32
    if model_cfg.dtype not in DTYPES:
        raise DlmaError(f"unknown dtype {model_cfg.dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[model_cfg.dtype]


def _trackers(report_to: Sequence[str]) -> list[str]:
    import importlib.util

    out = []
    for name in report_to:
        if name not in ("tensorboard", "wandb"):
            raise DlmaError(f"--report-to: unknown tracker {name!r}; choose tensorboard or wandb")
        module = "torch.utils.tensorboard" if name == "tensorboard" else "wandb"
        try:
            ok = importlib.util.find_spec(module) is not None and (name != "tensorboard" or importlib.util.find_spec("tensorboard") is not None)
        except ModuleNotFoundError:
            ok = False
        if ok:
            out.append(name)
        else:
            print(f"dlma train: {name} is not installed; not logging to it")
    return out


def _step_in_backward(cfg: TrainConfig, accelerator) -> bool:
    """Whether each weight is updated inside backward: exact only when its gradient is final there."""
    from accelerate.utils import DistributedType

    why = []
    if accelerator.num_processes > 1 or accelerator.distributed_type != DistributedType.NO:
        why.append("more than one process (gradients are reduced after the backward)")
    if cfg.grad_accum > 1:
        why.append("--grad-accum > 1")
    if cfg.max_grad_norm > 0:
        why.append("--max-grad-norm > 0 (the global norm needs every gradient first)")
    if cfg.micro_tokens > 0:
        why.append("--micro-tokens (a micro-batch's gradients add up over its passes)")
    if cfg.step_in_backward == "on" and why:
        raise DlmaError(f"--step-in-backward on is not exact with {'; '.join(why)}")
    return cfg.step_in_backward == "on" or (cfg.step_in_backward == "auto" and not why)


def _lazy_ranks(accelerator) -> bool:
    """True where FSDP loads weights on rank 0 only (cpu_ram_efficient_loading): the others hold meta tensors."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return bool(plugin is not None and getattr(plugin, "cpu_ram_efficient_loading", False))


def deepspeed_follows(plugin, cfg: TrainConfig, world: int) -> None:
    """Under DeepSpeed, make the engine clip, batch and accumulate as dlma's flags say (call before prepare).

    The engine clips by its own config, not by `accelerator.clip_grad_norm_`, and accelerate fills
    a missing or `auto` gradient_clipping with 1.0 at prepare, so --max-grad-norm (0 = off) was
    silently replaced. prepare also cannot size an `auto` micro-batch without a dataloader (dlma
    passes none), and takes the config's accumulation over the Accelerator's. No-op without DeepSpeed.
    """
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["gradient_clipping"] = float(cfg.max_grad_norm)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * world


class BackwardStepper:
    """AdamW applied per parameter from a post-accumulate-grad hook, the gradient freed right after.

    The update is the same fused AdamW as a whole-model step (per-parameter, there is no
    cross-parameter coupling without clipping); the moments live in `optimizer.state`, so
    checkpoints save and resume them unchanged. A gradient holding NaN/inf is not applied. With
    the fused kernel the check stays on the device: the kernel's own `found_inf` input (what
    GradScaler uses) skips the update, so backward never waits for the host; reading the flag
    once per step (`take_nonfinite`) is the only synchronisation. Without it (an optimizer built
    unfused) each hook asks the host.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
        self.optimizer = optimizer  # the (prepared) optimizer whose state and lr are used
        inner = getattr(optimizer, "optimizer", optimizer)
        self.inner = inner
        import inspect

        accepted = inspect.signature(type(inner).__init__).parameters
        defaults = {k: v for k, v in inner.defaults.items() if k in accepted and k != "params"}
        self.single = {p: type(inner)([p], **defaults) for p in params}
        self.on_device = bool(defaults.get("fused"))
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self.nonfinite: torch.Tensor | int = 0  # gradients dropped for NaN/inf since take_nonfinite

    def _hook(self, p: torch.nn.Parameter) -> None:
        opt = self.single[p]
        if self.on_device:
            found = (~torch.isfinite(p.grad).all()).float()  # 1: the fused kernel leaves p and its moments
            opt.found_inf = found
            self.nonfinite = self.nonfinite + found
        elif not bool(torch.isfinite(p.grad).all()):
            p.grad = None
            self.nonfinite += 1
            return
        opt.state = self.inner.state  # re-linked every time: load_state_dict replaces the dict
        opt.param_groups[0]["lr"] = self.inner.param_groups[0]["lr"]
        opt.step()
        p.grad = None

    def take_nonfinite(self) -> int:
        """How many gradients were dropped since the last call (one host read)."""
        n, self.nonfinite = int(self.nonfinite), 0
        return n

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def reference_logprobs(model, examples: list[Example], pad_id: int, accelerator, batch_size: int) -> None:
    """Fill the reference log-probs of every example's responses from the current (initial) weights, sharded over processes."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(examples), world))
    ranked = [[examples[i].chosen, *examples[i].middle, examples[i].rejected] for i in mine]
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        sums, _ = score_sequences(model, [examples[i].context for i, r in zip(mine, ranked) for _ in r],
                                  [x for r in ranked for x in r], pad_id=pad_id, batch_size=batch_size)
    model.train(was_training)
    local, at = [], 0
    for i, r in zip(mine, ranked):
        local.append((i, sums[at:at + len(r)]))
        at += len(r)
    for i, lps in (gather_object(local) if world > 1 else local):
        set_reference(examples[i], lps)


def set_reference(e: Example, lps: Sequence[float]) -> None:
    """Reference log-probs of [chosen, *middle, rejected], as `reference_logprobs` computes and the cache keeps them."""
    e.ref_chosen, e.ref_rejected = lps[0], lps[-1]
    e.ref_middle = list(lps[1:-1]) if e.middle else None


# -- the public entry point ------------------------------------------------------
def train_model(model_cfg: ModelConfig, cfg: TrainConfig, data: str, out_dir: str, *, progress: bool = True) -> dict:
    """Train on a (scored) pair file and save the model to out_dir; returns the run summary.

    Rerunning with the same out_dir resumes from its last checkpoint; a finished run returns
    its summary without training again.
    """
    validate(cfg)
    out = Path(out_dir)
    accelerator = _accelerator(model_cfg, cfg, out)
    key = _resume_key(cfg, model_cfg, data, accelerator.num_processes)
    finished = _finished_summary(out, key)
    if finished is not None:
        return finished
    run = _setup(accelerator, model_cfg, cfg, data, out, key)
    log = _Log(run, progress)
    while run.step < run.total:
        epoch, micros = run.micro_batches()
        result = _train_step(run, micros, lr_at(run.step, run.total, cfg))
        run.step += 1
        row = _account(run, epoch, result)  # raises after MAX_NONFINITE_STEPS skipped steps in a row
        log.step(row, result.loss)
        if run.selector is not None and run.selector.due(run.step):
            _probe(run, log)
        if cfg.save_steps and run.step % cfg.save_steps == 0 and run.step < run.total:
            _save_checkpoint(accelerator, out, run.step, key, cfg.save_total_limit,
                             run.selector.save_state if run.selector is not None else None)
    log.close()
    return _finish(run, log)


# -- the run and its setup -------------------------------------------------------
@dataclass
class _Run:
    """One run's state: what `_setup` builds, the step the loop is at, and this session's tallies."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    out: Path
    key: dict
    accelerator: Accelerator
    tok: PreTrainedTokenizerBase
    counts: dict  # pairs read, flipped, filtered, used
    examples: list[Example]
    lengths: list[int]
    strata: list[str] | None  # each pair's preset, where --balance-presets
    model: torch.nn.Module  # as prepared by accelerate (a DDP/FSDP/DeepSpeed wrapper where there is one)
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    stepper: BackwardStepper | None
    ref_path: str  # where the reference log-probs came from
    ref_seconds: float
    per_epoch: int = 0  # optimizer steps
    total: int = 0
    step: int = 0  # optimizer steps done, counting those before a resume
    selector: Selector | None = None
    # this session's loop only (a resumed run counts the steps it ran)
    first_loss: float | None = None
    last: dict | None = None  # the latest metrics line
    bad_in_a_row: int = 0
    tokens: int = 0
    positions: int = 0
    head_positions: int = 0  # of `positions`, those through the output layer
    seconds: float = 0.0
    plan_epoch: int = -1
    plan: list[list[list[int]]] = field(default_factory=list)
    pair_tokens: list[int] = field(default_factory=list)  # what --micro-tokens counts, per example

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def micro_per_step(self) -> int:
        return self.world * self.cfg.grad_accum

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world * self.cfg.grad_accum

    def epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        return epoch_plan(self.lengths, self.global_batch, self.micro_per_step, epoch, self.cfg.seed, self.strata)

    def micro_batches(self) -> tuple[int, list[list[int]]]:
        """The current step's epoch and micro-batches (example indices); each epoch is planned once."""
        epoch, index = divmod(self.step, self.per_epoch)
        if epoch != self.plan_epoch:
            self.plan, self.plan_epoch = self.epoch_steps(epoch), epoch
        return epoch, self.plan[index]


def _accelerator(model_cfg: ModelConfig, cfg: TrainConfig, out: Path) -> Accelerator:
    """The run's Accelerator; an unknown or missing device is a clean error before any work."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    from .models import resolve_device

    resolve_device(model_cfg.device)
    # accelerate sets up multi-process CPU runs (gloo) only when told cpu=True
    cpu = model_cfg.device == "cpu" or (model_cfg.device == "auto" and not torch.cuda.is_available())
    # No autocast weight cache: a cached low-precision copy of every weight would live through
    # the whole forward even where checkpointing recomputes the layer; recasting costs little.
    return Accelerator(cpu=cpu, mixed_precision=_mixed_precision(cfg, model_cfg),
                       gradient_accumulation_steps=cfg.grad_accum,
                       kwargs_handlers=[AutocastKwargs(cache_enabled=False)],
                       log_with=_trackers(cfg.report_to) or None, project_dir=str(out))


def _finished_summary(out: Path, key: dict) -> dict | None:
    """The summary of a run already finished in `out` with these settings; None where none finished."""
    if not (out / SUMMARY).is_file():
        return None
    summary = json.loads((out / SUMMARY).read_text())
    if summary.get("resume_key") != key:
        raise DlmaError(f"{out} already holds a model trained with other settings; choose another --out")
    return summary


def _checkpoint(out: Path, key: dict) -> Path | None:
    """The checkpoint to resume from, which must have been written with these settings."""
    ckpt = last_checkpoint(out)
    if ckpt is not None:
        saved = json.loads((ckpt / STATE).read_text())
        if saved.get("resume_key") != key:
            raise DlmaError(f"{ckpt} was written with other settings (or another number of processes x batch); "
                            f"rerun with the same flags to resume, or choose another --out")
    return ckpt


def _setup(accelerator: Accelerator, model_cfg: ModelConfig, cfg: TrainConfig, data: str, out: Path,
           key: dict) -> _Run:
    """Everything before the first step: examples, weights and their reference log-probs, the
    prepared model and optimizer, the plan's length, and the state of a checkpoint to resume."""
    from accelerate.utils import DistributedType, set_seed

    from .models import load_tokenizer, load_weights
    from .prompts import Renderer, load_preset

    ckpt = _checkpoint(out, key)
    set_seed(cfg.seed)
    tok = load_tokenizer(model_cfg.model)
    renderer = Renderer(tok, load_preset(cfg.preset) if cfg.preset else None, cfg.max_context)
    pairs, counts = select_pairs(read_pairs(data, cfg.limit), cfg)
    if not pairs:
        raise DlmaError(f"{data}: no pairs left to train on ({counts})")
    _check_presets_named(pairs, data, "--rpo-presets", cfg.rpo_presets if cfg.rpo_alpha else [], "NLL",
                         lambda preset: _nll_on(cfg, preset))
    _check_presets_named(pairs, data, "--kl-presets", cfg.kl_presets if cfg.kl_alpha else [], "KL",
                         lambda preset: _kl_on(cfg, preset))
    examples = build_examples(pairs, renderer, listwise=cfg.loss == "listwise", response_tokens=cfg.response_tokens,
                              whole_chosen=(lambda rec: _nll_on(cfg, rec.get("preset"))) if _rpo_whole(cfg) else None)

    model = load_weights(model_cfg.model, _weights_dtype(model_cfg), model_cfg.attn_implementation)
    # FSDP's cpu_ram_efficient_loading leaves ranks > 0 on the meta device until prepare fills them
    if not _lazy_ranks(accelerator):
        model.to(accelerator.device)
    model.config.use_cache = False
    ref_path, ref_seconds = _reference(accelerator, model, tok.pad_token_id, examples, pairs, model_cfg, cfg,
                                       data, out, ckpt)
    ref_seconds += _kl_reference(accelerator, model, tok, examples, model_cfg, cfg, out)
    if cfg.torch_compile and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise DlmaError("--torch-compile compiles the layers before accelerate wraps them, which FSDP and DeepSpeed "
                        "shard afterwards; under those set accelerate's own dynamo options in the config file "
                        "(dynamo_config: dynamo_backend INDUCTOR, dynamo_use_regional_compilation true), which "
                        "compile after wrapping")
    model, params = _trainable(model, cfg)
    optimizer = _adamw(params, cfg)
    if cfg.micro_tokens and accelerator.state.deepspeed_plugin is not None:
        raise DlmaError("--micro-tokens splits a micro-batch into several backward passes, which DeepSpeed's engine "
                        "counts as accumulation steps of its own; use --batch-size and --grad-accum under DeepSpeed")
    deepspeed_follows(accelerator.state.deepspeed_plugin, cfg, accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    stepper = BackwardStepper(optimizer, params) if _step_in_backward(cfg, accelerator) else None

    run = _Run(cfg, model_cfg, out, key, accelerator, tok, counts, examples, [e.length for e in examples],
               [str(rec.get("preset")) for rec in pairs] if cfg.balance_presets else None,
               model, params, optimizer, stepper, ref_path, ref_seconds)
    run.pair_tokens = [e.tokens for e in examples]
    run.per_epoch = len(run.epoch_steps(0))
    if run.per_epoch == 0:
        raise DlmaError(f"{len(examples)} pairs are fewer than the {run.micro_per_step} micro-batches of one step")
    run.total = cfg.max_steps if cfg.max_steps is not None else run.per_epoch * cfg.epochs
    _resume(run, ckpt)
    if cfg.select_prompts:
        if run.world > 1:
            raise DlmaError("--select-prompts probes the model with greedy answers on one process; run it without "
                            "accelerate launch, or drop --select-prompts and evaluate checkpoints afterwards")
        from .selection import Selector

        run.selector = Selector(cfg, tok, renderer, out, run.total, ckpt)
    return run


def _reference(accelerator: Accelerator, model: torch.nn.Module, pad_id: int, examples: list[Example],
               pairs: list[dict], model_cfg: ModelConfig, cfg: TrainConfig, data: str, out: Path,
               ckpt: Path | None) -> tuple[str, float]:
    """Fill in the reference log-probs: from the scored file, then a cache from an interrupted
    run, else computed now from the initial weights (and cached). Returns where they came
    from and the seconds spent computing them."""
    if cfg.loss == "sft":
        return "not needed (sft)", 0.0
    computed = "computed once before the first step from the initial weights"
    ref_seconds = 0.0
    cache = out / REFERENCE
    stale = _stale_reference(pairs, model_cfg)
    if stale:
        for e in examples:
            e.ref_chosen = e.ref_rejected = None
    if all(e.ref_chosen is not None and e.ref_rejected is not None for e in examples):
        ref_path = "from the scored file"
    elif cache.is_file():
        saved = json.loads(cache.read_text())
        for e in examples:
            set_reference(e, saved[e.id])
        ref_path = computed
    else:
        if ckpt is not None:
            raise DlmaError(f"{cache} is missing, so the reference of {ckpt} cannot be rebuilt; choose another --out")
        if _lazy_ranks(accelerator):
            raise DlmaError(f"{data}: the pairs carry no reference log-probs, and with FSDP's cpu_ram_efficient_loading "
                            "only rank 0 holds weights before training starts; run `dlma score` on them first (it "
                            "writes ref_lp_chosen/ref_lp_rejected), or set fsdp_cpu_ram_efficient_loading: false")
        t0 = time.perf_counter()
        reference_logprobs(model, examples, pad_id, accelerator, cfg.batch_size * 2)
        ref_seconds = time.perf_counter() - t0
        if accelerator.is_main_process:
            write_json(cache, {e.id: [e.ref_chosen, *(e.ref_middle or []), e.ref_rejected] for e in examples})
        ref_path = computed
    if stale:
        ref_path += f" (the scored file's were made {stale})"
    return ref_path, ref_seconds


def _kl_reference(accelerator: Accelerator, model: torch.nn.Module, tok, examples: list[Example],
                  model_cfg: ModelConfig, cfg: TrainConfig, out: Path) -> float:
    """--kl-alpha: give every --kl-presets example the untouched model's greedy answer to its
    prompt and the reference's top-K next-token log-probs along it. Made once by the main process
    (the only one holding weights under FSDP's lazy loading) from the initial weights, cached in
    `out` for a resumed run; returns the seconds spent making them."""
    if not cfg.kl_alpha:
        return 0.0
    wanted = [e for e in examples if _kl_on(cfg, e.preset)]
    key = {"model": model_cfg.model, "dtype": model_cfg.dtype, "kl_tokens": cfg.kl_tokens, "top_k": KL_TOP_K}
    cache = out / KL_REFERENCE
    t0 = time.perf_counter()

    def cached() -> dict | None:
        if not cache.is_file():
            return None
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        ok = saved.get("key") == key and all(str(tuple(e.context)) in saved["answers"] for e in wanted)
        return saved if ok else None

    saved = cached() if accelerator.is_main_process else None
    if accelerator.is_main_process and saved is None:
        out.mkdir(parents=True, exist_ok=True)
        print(f"dlma train: the untouched model answers the {len(wanted)} --kl-presets prompts (greedy, "
              f"{cfg.kl_tokens} tokens) for the KL term, once; cached in {cache}", file=sys.stderr, flush=True)
        saved = _untouched_answers(model, tok, [e.context for e in wanted], cfg.kl_tokens, key)
        with replacing(cache) as tmp:
            torch.save(saved, tmp)
    accelerator.wait_for_everyone()
    saved = saved or cached()
    if saved is None:
        raise DlmaError(f"{cache}: the untouched model's answers for --kl-alpha could not be read back")
    attach_kl_answers(wanted, saved)
    return time.perf_counter() - t0


def attach_kl_answers(examples: Sequence[Example], saved: dict) -> None:
    """Give each example its prompt's untouched answer and reference log-probs from `saved`
    (`_untouched_answers`' output); an empty answer leaves the example without the KL branch."""
    for e in examples:
        c = str(tuple(e.context))
        if saved["answers"][c]:
            e.kl_answer, e.kl_ref_ids, e.kl_ref_lp = saved["answers"][c], saved["ids"][c], saved["lp"][c]


@torch.inference_mode()
def _untouched_answers(model: torch.nn.Module, tok, contexts: list[list[int]], max_new_tokens: int, key: dict) -> dict:
    """Greedy answers of `model` (the starting weights) to the distinct contexts, their stop token
    kept where they finished, and the top-K log-probs of the next token at each answer position,
    both through the same routines generation and training use."""
    from .generate import SamplingParams, TransformersBackend

    distinct = list(dict.fromkeys(tuple(c) for c in contexts))
    was_training = model.training
    model.eval()
    try:
        samples = TransformersBackend(model, tok, KL_BATCH).sample([list(c) for c in distinct],
                                                                    SamplingParams(max_new_tokens, 0.0, 1.0, 0))
        answers = [(s.ids + ([s.stop_id] if s.finished and s.stop_id is not None else []))[:max_new_tokens]
                   for s in samples]
        saved: dict = {"key": key, "answers": {}, "ids": {}, "lp": {}}
        device = next(model.parameters()).device
        for start in range(0, len(distinct), KL_BATCH // 4):
            part = [i for i in range(start, min(start + KL_BATCH // 4, len(distinct))) if answers[i]]
            if not part:
                continue
            res = branch_logits(model, [list(distinct[i]) for i in part], [[answers[i]] for i in part],
                                tok.pad_token_id, device)
            for j, i in enumerate(part):
                top = res.distributions(j, 0).topk(KL_TOP_K, dim=-1)
                c = str(distinct[i])
                saved["ids"][c], saved["lp"][c] = top.indices.to("cpu", torch.int32), top.values.float().cpu()
        for c, a in zip(distinct, answers):
            saved["answers"][str(c)] = a if str(c) in saved["ids"] else []
    finally:
        model.train(was_training)
    return saved


def _trainable(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The model in training mode, with checkpointing and LoRA where asked, and the parameters it trains."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise DlmaError("--lora-r needs peft: pip install 'dlma[lora]'") from None
        target = cfg.lora_target[0] if cfg.lora_target == ["all-linear"] else list(cfg.lora_target)
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=target, task_type="CAUSAL_LM"))
    model.train()
    if cfg.torch_compile:
        compile_layers(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def compile_layers(model: torch.nn.Module) -> int:
    """--torch-compile: compile each decoder layer in place (torch's regional compilation: the
    layers share one compiled graph, so compiling costs one layer's time, not the model's), with
    dynamic shapes because packed rows change length every batch. In place, the module tree,
    its state-dict keys and its hooks stay as they were: checkpoints load either way."""
    names = set(getattr(model, "_no_split_modules", None) or getattr(getattr(model, "base_model", None), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DlmaError(f"--torch-compile: {type(model).__name__} names no decoder layer class (_no_split_modules) to compile")
    if getattr(model, "is_gradient_checkpointing", False):
        # transformers' layers record outputs (for output_hidden_states, which training never
        # asks for) in a context variable; dynamo refuses that side effect under checkpointing
        # and would leave every layer uncompiled, unless told the recompute may skip it
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    try:  # the fused kernel updates in place: faster, and no second copy of the weights at step time
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _resume(run: _Run, ckpt: Path | None) -> None:
    """The checkpoint's model, optimizer and RNG states and step; metrics.jsonl cut back to that step."""
    if ckpt is not None:
        run.accelerator.load_state(str(ckpt))
        run.step = json.loads((ckpt / STATE).read_text())["step"]
    if run.accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        # Drop log lines past the checkpoint we resume from (and a line a kill cut short): the
        # log reads as one run. Replaced atomically, so a kill here keeps the old log whole.
        metrics = run.out / METRICS
        kept = []
        if run.step and metrics.is_file():
            kept = [ln for ln in metrics.read_text().splitlines() if _logged_step(ln) <= run.step]
        write_text(metrics, "".join(ln + "\n" for ln in kept))


# -- one optimizer step ----------------------------------------------------------
@dataclass
class _Step:
    """What one optimizer step leaves for the log, summed over every process."""

    lr: float
    stats: torch.Tensor  # float64: loss sum, margin sum, correct, pairs, tokens, positions, KL sum, pairs with KL,
    #                      positions through the output layer
    grad_norm: torch.Tensor | None  # where gradients were clipped
    bad: bool  # a NaN/inf loss or gradient: the update was skipped
    seconds: float

    @property
    def loss(self) -> float:
        return float(self.stats[0] / self.stats[3])


def _train_step(run: _Run, micros: list[list[int]], lr: float) -> _Step:
    """One optimizer step over this process's micro-batches of `micros` (the global batch)."""
    cfg, accelerator, model, optimizer, stepper = run.cfg, run.accelerator, run.model, run.optimizer, run.stepper
    world = run.world
    n_step = sum(len(m) for m in micros)
    for group in optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    stats = torch.zeros(9, dtype=torch.float64)
    grad_norm = None
    bad = False
    # sum / (pairs in the global step), times the factors that DDP averaging and accelerate's
    # division by grad_accum take out again
    scale = world * cfg.grad_accum / n_step
    for k in range(accelerator.process_index, run.micro_per_step, world):
        with accelerator.accumulate(model):
            chunks = token_chunks(micros[k], run.pair_tokens, cfg.micro_tokens)
            for j, chunk in enumerate(chunks):
                # passes before a micro-batch's last add up gradients locally; the last one reduces them
                with accelerator.no_sync(model) if j < len(chunks) - 1 else contextlib.nullcontext():
                    row, finite = _backward_pass(run, chunk, scale)
                stats += row
                bad |= not finite
            if stepper is not None:
                bad |= stepper.take_nonfinite() > 0
            else:  # else every weight was already updated inside backward
                if accelerator.sync_gradients:
                    bad = _nonfinite_gradients(model, accelerator, bad)
                    if not bad and cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(run.params if cfg.lora_r else model.parameters(),
                                                                cfg.max_grad_norm)
                    if not bad:
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    stats = accelerator.reduce(stats.to(accelerator.device), "sum").cpu() if world > 1 else stats
    return _Step(lr, stats, grad_norm, bad, time.perf_counter() - t0)


def _backward_pass(run: _Run, chunk: list[int], scale: float) -> tuple[torch.Tensor, bool]:
    """Forward and backward of the pairs `chunk`: its stats row and whether its loss was finite.

    Updates inside backward (one process) must not see a non-finite loss at all."""
    res, ntok, positions = micro_batch_losses(run.model, [run.examples[i] for i in chunk], run.cfg, run.pad_id,
                                              run.accelerator.device)
    total = res.losses.sum()
    finite = bool(torch.isfinite(total))
    if run.stepper is None or finite:
        run.accelerator.backward(total * scale)
    margin = (res.chosen_rewards - res.rejected_rewards).detach()
    kl_sum, kl_n = (float(res.kl.sum()), sum(bool(run.examples[i].kl_answer) for i in chunk)) if res.kl is not None else (0.0, 0)
    row = torch.tensor([float(res.losses.detach().sum()), float(margin.sum()), float((margin > 0).sum()),
                        len(chunk), ntok, positions.body, kl_sum, kl_n, positions.head], dtype=torch.float64)
    return row, finite


def _nonfinite_gradients(model, accelerator, bad: bool) -> bool:
    """Whether this step must be skipped: a NaN/inf loss here, or a NaN/inf gradient on any process."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not bad and grads:  # one host read for the whole model, not one per tensor
        bad = not bool(torch.stack([torch.isfinite(g).all().to(accelerator.device) for g in grads]).all())
    if accelerator.num_processes > 1:  # every process must make the same choice (FSDP shards differ)
        flag = torch.tensor([float(bad)], device=accelerator.device)
        bad = bool(accelerator.reduce(flag, "sum").item() > 0)
    return bad


def _account(run: _Run, epoch: int, result: _Step) -> dict:
    """Count the step just done (run.step) into the run's tallies and return its metrics line;
    MAX_NONFINITE_STEPS skipped steps in a row stop the run."""
    stats, loss = result.stats, result.loss
    run.bad_in_a_row = run.bad_in_a_row + 1 if result.bad else 0
    if run.bad_in_a_row >= MAX_NONFINITE_STEPS:
        raise DlmaError(f"training stopped at step {run.step}: {run.bad_in_a_row} steps in a row had a NaN or infinite "
                        "loss or gradient (skipped; none reached the weights). Lower --lr, try --mixed-precision no, "
                        "or check the pair file")
    run.first_loss = loss if run.first_loss is None and not result.bad else run.first_loss
    run.tokens += int(stats[4])
    run.positions += int(stats[5])
    run.head_positions += int(stats[8])
    run.seconds += result.seconds
    row = {"step": run.step, "epoch": epoch, "loss": _finite(loss), "lr": result.lr, "pairs": int(stats[3]),
           "tokens": int(stats[4]), "tokens_per_s": float(stats[4]) / result.seconds}
    if run.cfg.loss != "sft":
        row.update(reward_margin=_finite(float(stats[1] / stats[3])), reward_accuracy=float(stats[2] / stats[3]))
    if stats[7] > 0:  # mean per-token KL to the untouched model on its own answers (--kl-alpha)
        row["kl"] = _finite(float(stats[6] / stats[7]))
    if result.grad_norm is not None:
        row["grad_norm"] = _finite(float(result.grad_norm))
    if result.bad:
        row["skipped"] = True  # NaN/inf loss or gradient: the weights were not updated
    run.last = row
    return row


def _finite(x: float) -> float | None:
    """A metric for the JSON logs: NaN/inf become null (JSON has no NaN)."""
    return x if math.isfinite(x) else None


# -- logging ---------------------------------------------------------------------
class _Log:
    """Where the steps are reported: metrics.jsonl (main process), --report-to trackers, the progress bar."""

    def __init__(self, run: _Run, progress: bool):
        from tqdm.auto import tqdm

        self.accelerator, self.progress = run.accelerator, progress
        self.path, self.every, self.total = run.out / METRICS, run.cfg.log_steps, run.total
        self.main = run.accelerator.is_main_process
        self.trackers = bool(run.accelerator.log_with) if hasattr(run.accelerator, "log_with") else False
        if self.trackers:
            run.accelerator.init_trackers("dlma", config={k: str(v) for k, v in asdict(run.cfg).items()})
        self.bar = tqdm(total=run.total, initial=run.step, desc=f"train {run.cfg.loss}", unit="step",
                        disable=not (progress and self.main), dynamic_ncols=True)

    def step(self, row: dict, loss: float) -> None:
        """Every --log-steps and the last step go to the file and trackers; `loss` as computed (NaN shows)."""
        step = row["step"]
        if self.main and (step % self.every == 0 or step == self.total):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.trackers:
                self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        self.bar.update(1)

    def note(self, text: str) -> None:
        if self.progress:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()

    def end(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line that is not a whole record."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _probe(run: _Run, log: _Log) -> None:
    """--select-prompts: probe this step's weights; the selector keeps the best step's on disk."""
    # a probe's few greedy answers run the layers eagerly: compiling their prefill and decode
    # graphs (--torch-compile) would cost more than the probe
    with torch.compiler.set_stance("force_eager") if run.cfg.torch_compile else contextlib.nullcontext():
        probe = run.selector.probe(run.step, run.accelerator.unwrap_model(run.model))
    log.note(f"step {run.step}: {run.cfg.select_prompts} refused {probe.refusal:.1%} of unsafe, "
             f"{probe.over_refusal:.1%} of safe prompts; keeping step {run.selector.kept}")


# -- saving ----------------------------------------------------------------------
def _save_checkpoint(accelerator, out: Path, step: int, key: dict, limit: int,
                     extra: Callable[[Path], None] | None = None) -> None:
    """Model, optimizer and RNG states via accelerate (sharded under FSDP/DeepSpeed), then
    `extra` (the selection's probes), the state file last."""
    path = out / "checkpoints" / f"step-{step}"
    # torch.save, not safetensors: tied embeddings share storage, which safetensors refuses.
    accelerator.save_state(str(path), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(path)
        write_json(path / STATE, {"step": step, "resume_key": key})
        done = sorted((p for p in (out / "checkpoints").glob("step-*") if (p / STATE).is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[: max(0, len(done) - max(1, limit))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _finish(run: _Run, log: _Log) -> dict:
    """After the last step: the final model (the selected step's weights, where one was
    selected) and train_summary.json; the checkpoints go, a finished run needs none."""
    accelerator = run.accelerator
    if run.stepper is not None:
        run.stepper.remove()
    accelerator.wait_for_everyone()
    if run.selector is not None:
        run.selector.restore(accelerator.unwrap_model(run.model), run.step)
    _save_final(accelerator, run.model, run.tok, run.out, run.cfg, run.model_cfg)
    summary = _summary(run)
    if accelerator.is_main_process:
        write_json(run.out / SUMMARY, summary)
        if run.selector is not None:
            run.selector.cleanup()
        shutil.rmtree(run.out / "checkpoints", ignore_errors=True)
    log.end()
    accelerator.wait_for_everyone()
    return summary


def interpolated(state: dict, start: dict, ratio: float) -> dict:
    """start + ratio * (state - start) per tensor, computed in float32 and stored in each
    tensor's own dtype (ratio 0 gives `start` exactly, 1 gives `state`). Tensors that share
    storage in `state` (tied embeddings) share their result, so saving still writes them once."""
    if set(state) - set(start):
        raise DlmaError(f"--interpolate: the starting model has no weights {sorted(set(state) - set(start))[:3]}")
    out, done = {}, {}
    for name, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in done:
            s0 = start[name].to(device=v.device, dtype=torch.float32)
            done[key] = (s0 + ratio * (v.float() - s0)).to(v.dtype)
        out[name] = done[key]
    return out


def _save_final(accelerator, model, tok, out: Path, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """A directory AutoModelForCausalLM/AutoTokenizer load: full or merged weights, or a LoRA
    adapter, moved `cfg.interpolate` of the way from the starting weights."""
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every process calls it
    if accelerator.is_main_process:
        if cfg.interpolate != 1 and cfg.lora_r > 0:
            # the update is B @ A * scale: scaling B scales it exactly, merged or not
            with torch.no_grad():
                for name, p in unwrapped.named_parameters():
                    if "lora_B" in name:
                        p.mul_(cfg.interpolate)
        elif cfg.interpolate != 1:
            from .models import load_weights

            start = load_weights(model_cfg.model, _weights_dtype(model_cfg)).state_dict()
            state = interpolated(state, start, cfg.interpolate)
            del start
        if cfg.lora_r > 0 and cfg.save_merged:
            unwrapped = unwrapped.merge_and_unload()
            state = None
        if cfg.lora_r > 0 and not cfg.save_merged:
            unwrapped.save_pretrained(out)
        else:
            unwrapped.config.use_cache = True
            unwrapped.save_pretrained(out, state_dict=state)
        tok.save_pretrained(out)
    accelerator.wait_for_everyone()


def _summary(run: _Run) -> dict:
    """train_summary.json. The first loss and the skipped steps come from metrics.jsonl, which
    spans the runs before a resume; speed and FLOPs are this session's."""
    cfg, last = run.cfg, run.last
    history = ([json.loads(ln) for ln in (run.out / METRICS).read_text().splitlines() if ln.strip()]
               if run.accelerator.is_main_process else [])
    summary = {
        "out": str(run.out), "loss": cfg.loss, **run.counts,
        "reference": run.ref_path, "reference_seconds": round(run.ref_seconds, 3),
        "steps": run.step, "epochs": round(run.step / run.per_epoch, 3), "global_batch": run.global_batch,
        "processes": run.world, "mixed_precision": run.accelerator.mixed_precision,
        "step_in_backward": run.stepper is not None, "torch_compile": cfg.torch_compile, "share_context": cfg.share_context and cfg.loss != "sft",
        "weights_dtype": str(_weights_dtype(run.model_cfg)).replace("torch.", ""),
        "first_loss": next((r["loss"] for r in history if not r.get("skipped")), None) if history else run.first_loss,
        "final_loss": last["loss"] if last else None,
        "steps_skipped_nonfinite": sum(1 for r in history if r.get("skipped")),
        "reward_accuracy": last.get("reward_accuracy") if last else None,
        "reward_margin": last.get("reward_margin") if last else None,
        "train_seconds": round(run.seconds, 3),
        "tokens_per_s": round(run.tokens / run.seconds, 2) if run.seconds else None,
        # forward + backward of the policy, three forwards' worth (the reference is not counted)
        "model_flops": 3 * forward_flops(run.model, run.positions, run.head_positions),
        "interpolate": cfg.interpolate,
        "kl_pairs": sum(bool(e.kl_answer) for e in run.examples),
        "kl": last.get("kl") if last else None,
        "resume_key": run.key,
    }
    if run.selector is not None:
        summary["selection"] = run.selector.summary()
    return summary
