"""Scored pair records -> `Example`s: token ids, reference log-probs and what each loss reads.

Pairs are flipped (`--flip-negative`), rescaled (`--reward-norm`) and filtered (`--min-reward`)
by their self-reward R first; then each is rendered through `prompts.Renderer` under the bare
context, the one a deployed model sees.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import TrainConfig
from ..data import swap_sides
from ..errors import DlmaError
from ..objectives import objective


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

    @property
    def ranked(self) -> list[list[int]]:
        """Every response, best first: chosen, the ranked middle (listwise), rejected."""
        return [self.chosen, *self.middle, self.rejected]

    @property
    def reference(self) -> list[float | None]:
        """The reference log-probs of `ranked`."""
        return [self.ref_chosen, *(self.ref_middle or []), self.ref_rejected]


def set_reference(e: Example, lps: list[float]) -> None:
    """Reference log-probs of [chosen, *middle, rejected], as the reference pass computes and its cache keeps them."""
    e.ref_chosen, e.ref_rejected = lps[0], lps[-1]
    e.ref_middle = list(lps[1:-1]) if e.middle else None


def whole_chosen_kept(cfg: TrainConfig, response_tokens: int | None) -> bool:
    """Whether pairs carry their whole chosen response: the NLL term is on, over whole responses, while the pair loss is cut."""
    return cfg.rpo_whole and cfg.rpo_alpha > 0 and response_tokens is not None and objective(cfg.loss).takes("nll_whole")


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
    """Swap a seeded --noise-flip share of the pairs (an ablation), flip pairs with R < 0 (if asked),
    rescale R per preset (if asked), drop pairs that cannot teach (chosen identical to rejected, or an
    empty chosen) and pairs with R < --min-reward, and for the ablation permute R across the pairs kept."""
    needs_r = (objective(cfg.loss).uses_reward or cfg.min_reward is not None or cfg.flip_negative
               or cfg.reward_norm != "none" or cfg.shuffle_reward)
    if needs_r:
        for rec in pairs:
            if not isinstance(rec.get("self_reward"), (int, float)):
                raise DlmaError(f"pair {rec.get('id')!r} has no numeric `self_reward`, which --loss {cfg.loss}"
                                f"{' / --min-reward' if cfg.min_reward is not None else ''}"
                                f"{' / --flip-negative' if cfg.flip_negative else ''}"
                                f"{' / --reward-norm' if cfg.reward_norm != 'none' else ''}"
                                f"{' / --shuffle-reward' if cfg.shuffle_reward else ''} needs; run `dlma score` first")
    out, flipped, filtered, unusable = [], 0, 0, 0
    seen = []
    noisy = set(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed + 7919))
                [:round(cfg.noise_flip * len(pairs))].tolist()) if cfg.noise_flip else set()
    for i, rec in enumerate(pairs):
        if i in noisy:  # the ablation's wrong pairs: o+ is no longer the better answer, and R says so
            rec = dict(swap_sides(rec), noise_flipped=True)
        if cfg.flip_negative and rec.get("self_reward") < 0:
            rec = dict(swap_sides(rec), flipped=True)
            flipped += 1
        seen.append(rec)
    if cfg.reward_norm == "preset":
        seen = _preset_normalised(seen)
    for rec in seen:
        if rec.get("chosen") == rec.get("rejected") or not str(rec.get("chosen", "")).strip():
            unusable += 1  # the same answer twice teaches nothing; an empty o+ would teach saying nothing
            continue
        if cfg.min_reward is not None and rec["self_reward"] < cfg.min_reward:
            filtered += 1
            continue
        out.append(rec)
    if cfg.shuffle_reward and out:
        perm = torch.randperm(len(out), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        out = [dict(rec, self_reward=out[j]["self_reward"]) for rec, j in zip(out, perm)]
    return out, {"pairs_read": len(pairs), "pairs_noise_flipped": len(noisy), "pairs_flipped": flipped,
                 "pairs_unusable": unusable, "pairs_filtered": filtered, "pairs_used": len(out)}


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
        e = Example(
            id=str(rec["id"]),
            context=renderer.context_ids(rec["prompt"], "bare"),
            chosen=renderer.response_ids(rec["chosen"], bool(rec.get("chosen_truncated", False)), first=response_tokens),
            rejected=renderer.response_ids(rec["rejected"], bool(rec.get("rejected_truncated", False)), first=response_tokens),
            self_reward=rec.get("self_reward"),
            ref_chosen=float(ref_c) if isinstance(ref_c, (int, float)) else None,
            ref_rejected=float(ref_r) if isinstance(ref_r, (int, float)) else None,
            preset=rec.get("preset"),
        )
        if whole_chosen is not None and response_tokens is not None and whole_chosen(rec):
            whole = renderer.response_ids(rec["chosen"], bool(rec.get("chosen_truncated", False)))
            e.whole_chosen = whole if len(whole) > len(e.chosen) else None
        out.append(e)
    return out
