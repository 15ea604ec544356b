"""The self-rewarding score R, the bare-context reference log-probs, and the RLAIF text judge.

    R = [lp(o+|p+) - lp(o+|p-)] - [lp(o-|p+) - lp(o-|p-)]

All log-probs come from logprobs.score_trees: each context is laid out once with every
response it must score as a branch, and the prefix shared by a family of contexts (system
prompt, demonstration set) is computed once and its KV reused by all of them; logits are
taken on response positions only, in float32. In float32, lp(o+|p+) and lp(o-|p-) are taken
from the pair file when generation recorded them under the same model and preset (they are
the raw log-probs of the sampled tokens), so only the cross terms need branches.
benchmarks/score.py measures this against the authors' four padded passes.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from .config import ModelConfig, SamplingConfig, ScoreConfig
from .data import (JsonlWriter, check_finite, check_not_input, check_same_inputs, file_hashes, named_files, pair_digest,
                   read_pairs, resume_chunks, write_json)
from .errors import DlmaError
from .logprobs import score_trees
from .machine import forward_flops
from .pairfile import ANSWERS, answer_text, conversational, upgrade_before_append
from .pairstats import contrast, quantiles
from .models import bf16_supported, load_model, resolve_device, resolve_dtype
from .prompts import Preset, Renderer, as_messages, context_room, load_preset
from .textjudge import LetterJudge
from .tracking import Tracking, Where, typed_settings

TERMS = ["lp_chosen_pos", "lp_chosen_neg", "lp_rejected_pos", "lp_rejected_neg"]
# what of a pair its score depends on: a scored record whose input differs in one of them is stale
PAIR_INPUT = ("prompt", "chosen", "rejected", "chosen_truncated", "rejected_truncated", "preset")


def _pair_input(rec: dict) -> list:
    """What a scored record holds of the pair it was made from, answers as text whichever form
    (stored messages or in-memory strings) the record is in."""
    return [answer_text(rec.get(k)) if k in ANSWERS else rec.get(k) for k in PAIR_INPUT]
JUDGES = ("self-reward", "text", "both")
JUDGE_ALIASES = {"probability": "self-reward", "self_reward": "self-reward"}


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def _reusable(rec: dict, preset: Preset, model_dtype: str, model_name: str | None, ctx: dict) -> bool:
    """Generation's raw log-probs stand in for lp(o+|p+), lp(o-|p-) only when they are the same
    numbers a scoring pass would give: same model and preset, uncut contexts, and float32
    throughout. A bf16 generator rounds its logits to bf16 before the log-softmax (per-token
    errors of ~0.06 at logits ~20) while scoring takes the head in float32; mixing the two
    in one R flipped its sign on 1 in 8 generated pairs, so bf16 scoring recomputes all
    four terms in one precision (a branch of the same tree: ~15% more tokens)."""
    gen = rec.get("generation") or {}
    # generate records the preset as it was given (and a preset file's absolute path)
    if rec.get("preset") != preset.name and (preset.source or preset.name) not in (rec.get("preset"), rec.get("preset_file")):
        return False
    if rec.get("gen_lp_of") != pair_digest(rec):  # the pair was edited after generation: its log-probs are another text's
        return False
    room = context_room(int(gen.get("max_context", 1024)), int(gen.get("max_new_tokens", 0)))  # generate's cut
    if max(len(ctx["positive"]), len(ctx["negative"])) > room:
        return False
    gdtype = str(gen.get("dtype", ""))
    if gdtype == "auto":  # generate resolves auto the same way on the same machine

        gdtype = str(resolve_dtype("auto", resolve_device("auto"))).replace("torch.", "")
    return gdtype == model_dtype == "float32" and (model_name is None or gen.get("model") == model_name)


def _candidate_terms(rec: dict) -> dict[str, float] | None:
    """The picked pair's four terms from best-of-K generation, which scored every sample under p+
    and p- with the same `score_trees` (None when the record lacks them or was edited since)."""
    c = rec.get("candidates") or {}
    if "lp_pos" not in c or "lp_neg" not in c:
        return None
    k = len(c["texts"]) // 2
    i, j = c["picked"]["chosen"], k + c["picked"]["rejected"]
    if c["texts"][i] != rec["chosen"] or c["texts"][j] != rec["rejected"]:
        return None
    return {"lp_chosen_pos": float(c["lp_pos"][i]), "lp_chosen_neg": float(c["lp_neg"][i]),
            "lp_rejected_pos": float(c["lp_pos"][j]), "lp_rejected_neg": float(c["lp_neg"][j])}


class _Layout:
    """Token ids of one pair's contexts and responses, cut to fit the model's context."""

    def __init__(self, renderer: Renderer, limit: int | None):
        self.r, self.limit, self.truncated, self.cut = renderer, limit, 0, False

    def ids(self, rec: dict, sides: Sequence[str]) -> tuple[dict, list[int], list[int]]:
        query = as_messages(rec["prompt"])
        c = self.r.response_ids(rec["chosen"], bool(rec.get("chosen_truncated")))
        r = self.r.response_ids(rec["rejected"], bool(rec.get("rejected_truncated")))
        if self.limit:
            room = max(1, self.limit - max(len(c), len(r)))
            before = self.r.truncated
            # the query is cut, never the contrastive prefix; p+ and p- keep the same query
            contrast = [s for s in sides if s != "bare"]
            ctx = self.r.fit(query, contrast, room) if contrast else {}
            if "bare" in sides:
                ctx.update(self.r.fit(query, ["bare"], room))
            cut = self.r.truncated > before
            if len(c) >= self.limit or len(r) >= self.limit:
                c, r, cut = c[: self.limit - 1], r[: self.limit - 1], True
            self.truncated += int(cut)
            self.cut = cut
        else:
            ctx = {s: self.r.context_ids(query, s) for s in sides}
        return ctx, c, r


def pair_preset(rec: dict) -> str | None:
    """The preset a pair was made under. A preset file named relative to where the pairs were
    generated is found by the absolute path generate recorded beside it (`preset_file`)."""
    name, where = rec.get("preset"), rec.get("preset_file")
    if name and where and not Path(name).is_file() and Path(where).is_file():
        return where
    return name


def _resolve_preset(preset: Preset | str | None, pairs: list[dict]) -> Preset:
    if isinstance(preset, Preset):
        return preset
    return load_preset(preset or next((pair_preset(p) for p in pairs if p.get("preset")), "harmless"))


# bf16 bodies moved R by up to 0.75 on 32 generated pairs (benchmarks/score.py); a mixed-mode
# R closer to 0 than this is recomputed in float32, so its sign is the exact one. On the
# 2-core CPU this recheck (11/32 pairs) made mixed slower than exact (3.7x vs 4.3x the
# baseline), so exact is the default; mixed pays only where bf16 is much faster than float32.
MIXED_RECHECK_MARGIN = 1.0


def score_pairs(model, tokenizer, preset: Preset | str | None, pairs: list[dict], *, batch_size: int = 8,
                reference: bool = True, reuse_generation: bool = True, max_context: int | None = None,
                progress: bool = False, model_name: str | None = None, stats: dict | None = None,
                precision: str = "exact", response_tokens: int | None = None) -> list[dict]:
    """Copies of `pairs` with self_reward, its four terms, token counts and (reference) the bare-context lps.

    precision "exact" computes in the model's dtype (float32: exact to ~1e-4). "mixed", for a
    float32 model, runs the decoder body in bf16 (autocast; head and sums float32) and
    recomputes exactly the pairs whose |R| < MIXED_RECHECK_MARGIN, so R keeps the float32
    sign wherever bf16 rounding could flip it; the other pairs' terms carry bf16 error.
    response_tokens=N (with reference) adds ref_lp_chosen_first/ref_lp_rejected_first, the
    reference of each response's first N tokens, for training on openings (sampling.response_tokens).
    Empty responses get R = 0 (counted in stats["empty_responses"]); a NaN/inf raises a
    DlmaError naming the record. stats (optional) also collects reused/truncated/rechecked counts.
    """
    if precision not in ("exact", "mixed"):
        raise DlmaError(f"unknown precision {precision!r}; choose exact or mixed")
    kw = dict(batch_size=batch_size, reference=reference, max_context=max_context, progress=progress,
              model_name=model_name, response_tokens=response_tokens)
    if not _runs_mixed(precision, model):
        return _score_pairs(model, tokenizer, preset, pairs, reuse_generation=reuse_generation, stats=stats, **kw)
    stats = stats if stats is not None else {}
    out = _score_pairs(model, tokenizer, preset, pairs, reuse_generation=False, stats=stats, body=torch.bfloat16, **kw)
    near = [i for i, o in enumerate(out) if abs(o["self_reward"]) < MIXED_RECHECK_MARGIN and o["self_reward"] != 0.0]
    if near:
        redo: dict = {}
        again = _score_pairs(model, tokenizer, preset, [pairs[i] for i in near], reuse_generation=reuse_generation,
                             stats=redo, **kw)
        for k in ("positions", "head_positions"):
            stats[k] = stats.get(k, 0) + redo.get(k, 0)
        for i, o in zip(near, again):
            out[i] = o
    stats["mixed_rechecked"] = stats.get("mixed_rechecked", 0) + len(near)
    return out


def _score_pairs(model, tokenizer, preset: Preset | str | None, pairs: list[dict], *, batch_size: int,
                 reference: bool, reuse_generation: bool, max_context: int | None, progress: bool,
                 model_name: str | None, stats: dict | None, body: torch.dtype | None = None,
                 response_tokens: int | None = None) -> list[dict]:
    from tqdm.auto import tqdm

    preset = _resolve_preset(preset, pairs)
    stats = stats if stats is not None else {}
    for k in ("empty_responses", "reused_generation_logprobs", "contexts_truncated"):
        stats.setdefault(k, 0)
    limit = max_context or getattr(model.config, "max_position_embeddings", None)
    layout = _Layout(Renderer(tokenizer, preset), limit)
    dtype = _dtype_name(model)
    sides = ["positive", "negative"] + (["bare"] if reference else [])
    trees: list = []
    plan: list[tuple[dict, dict]] = []  # (record, {field: (tree index, branch)})
    for rec in pairs:
        out = dict(rec)
        ctx, c, r = layout.ids(rec, sides)
        reuse = reuse_generation and not layout.cut and _reusable(rec, preset, dtype, model_name, ctx)
        known = _candidate_terms(rec) if reuse else None
        where: dict[str, tuple[int, int]] = {}

        def add(side: str, named: list[tuple[str, list[int]]]) -> None:
            if named:
                trees.append((ctx[side], [ids for _, ids in named]))
                where.update({name: (len(trees) - 1, k) for k, (name, _) in enumerate(named)})

        if known:  # best-of-K generation already computed all four terms
            out.update(known)
            stats["reused_generation_logprobs"] += 1
        elif reuse and "gen_lp_chosen" in rec and "gen_lp_rejected" in rec:
            out["lp_chosen_pos"], out["lp_rejected_neg"] = float(rec["gen_lp_chosen"]), float(rec["gen_lp_rejected"])
            stats["reused_generation_logprobs"] += 1
            add("positive", [("lp_rejected_pos", r)])
            add("negative", [("lp_chosen_neg", c)])
        else:
            add("positive", [("lp_chosen_pos", c), ("lp_rejected_pos", r)])
            add("negative", [("lp_chosen_neg", c), ("lp_rejected_neg", r)])
        if reference:
            add("bare", [("ref_lp_chosen", c), ("ref_lp_rejected", r)])
            if response_tokens is not None:
                first = [layout.r.response_ids(rec[k], bool(rec.get(f"{k}_truncated")), first=response_tokens)
                         for k in ("chosen", "rejected")]
                # a response the layout cut to fit the context keeps that cut when shorter
                add("bare", [("ref_lp_chosen_first", min(first[0], c, key=len)),
                             ("ref_lp_rejected_first", min(first[1], r, key=len))])
                out["ref_first_tokens"] = response_tokens
            if model_name is not None:  # how the reference was made: training uses it only for the same model and precision
                out["ref_from"] = {"model": model_name, "dtype": dtype if body is None else f"{dtype}+bf16-body"}
        out["chosen_tokens"], out["rejected_tokens"] = len(c), len(r)
        plan.append((out, where))
    stats["contexts_truncated"] += layout.truncated
    bar = tqdm(total=len(trees), desc="score", unit="ctx", disable=not progress, dynamic_ncols=True)
    try:
        res = score_trees(model, trees, pad_id=tokenizer.pad_token_id, batch_size=batch_size, body_dtype=body,
                          on_batch=bar.update, stats=stats)
    finally:
        bar.close()
    keys = TERMS + (["ref_lp_chosen", "ref_lp_rejected"] if reference else [])
    keys += ["ref_lp_chosen_first", "ref_lp_rejected_first"] if reference and response_tokens is not None else []
    for out, where in plan:
        for name, (t, k) in where.items():
            out[name] = res[t][k][0]
        empty = not str(out["chosen"]).strip() or not str(out["rejected"]).strip()
        stats["empty_responses"] += int(empty)
        out["self_reward"] = 0.0 if empty else (out["lp_chosen_pos"] - out["lp_chosen_neg"]) - (
            out["lp_rejected_pos"] - out["lp_rejected_neg"])
        check_finite(out, keys + ["self_reward"], "score")
    return [o for o, _ in plan]


def ensemble_members(preset: Preset) -> list[Preset]:
    """One preset per demonstration set: the members whose R an ensemble averages."""
    if len(preset.demonstrations) < 2:
        raise DlmaError(f"preset {preset.name!r} has {len(preset.demonstrations)} demonstration set(s); an ensemble "
                        "averages R over several (give the preset more sets, or drop --ensemble)")
    return [dataclasses.replace(preset, name=f"{preset.name}@{k}", demonstrations=[group])
            for k, group in enumerate(preset.demonstrations)]


def score_ensemble(model, tokenizer, preset: Preset | str | None, pairs: list[dict], *, reference: bool = True,
                   stats: dict | None = None, **kw) -> list[dict]:
    """score_pairs under every demonstration set of the preset, R and its terms averaged.

    A single pair's R under one set mixes the attribute with that set's topics and wording; the
    mean over sets keeps what they share (the attribute). Each member's R is kept in
    self_reward_members. Generation's log-probs are not reused (they belong to one set).
    """
    preset = _resolve_preset(preset, pairs)
    runs = [score_pairs(model, tokenizer, m, pairs, reference=reference and k == 0, reuse_generation=False,
                        stats=stats if k == 0 else None, **kw) for k, m in enumerate(ensemble_members(preset))]
    out = []
    for i, first in enumerate(runs[0]):
        o = dict(first)
        for key in TERMS + ["self_reward"]:
            o[key] = statistics.fmean(run[i][key] for run in runs)
        o["self_reward_members"] = [run[i]["self_reward"] for run in runs]
        out.append(o)
    return out


# -- the RLAIF text judge --------------------------------------------------------------
def judge_pairs(model, tokenizer, preset: Preset | str | None, pairs: list[dict], *, batch_size: int = 8,
                max_context: int | None = None, progress: bool = False) -> list[dict]:
    """Copies of `pairs` with the text judge's verdict (`textjudge.LetterJudge.score_pairs`: the
    preset's judging question, both orders, judge_score > 0 prefers `chosen`)."""
    preset = _resolve_preset(preset, pairs)
    return LetterJudge(model, tokenizer, preset.judge_question, name="text", batch_size=batch_size,
                     max_context=max_context).score_pairs(pairs)


# -- summaries -------------------------------------------------------------------------
def _accuracy(xs: list[float]) -> float:
    return sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in xs) / len(xs)


def _describe(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "quantiles": quantiles(xs),
            "fraction_positive": sum(x > 0 for x in xs) / len(xs)}


def summarize_scores(records: Sequence[dict]) -> dict:
    """Count, mean/std/quantiles of R, fraction R > 0, per-token R, accuracy vs human labels, judge stats.

    accuracy (records with human_label, i.e. `chosen` is the human-preferred side): the
    fraction of pairs with R > 0, ties counting half.
    """
    out: dict = {"count": len(records)}
    rs = [float(r["self_reward"]) for r in records if r.get("self_reward") is not None]
    labelled = [r for r in records if r.get("human_label")]
    if rs:
        out["self_reward"] = _describe(rs)
        per_tok = [_per_token(r) for r in records if r.get("self_reward") is not None]
        out["self_reward_per_token"] = _describe(per_tok)
        if labelled:
            out["accuracy"] = _accuracy([float(r["self_reward"]) for r in labelled if r.get("self_reward") is not None])
            out["accuracy_per_token"] = _accuracy([_per_token(r) for r in labelled if r.get("self_reward") is not None])
    js = [r for r in records if r.get("judge_score") is not None]
    if js:
        pa = [p for r in js for p in r["judge_p_a"]]
        out["text_judge"] = {
            "judge_score": _describe([r["judge_score"] for r in js]),
            "position_bias": sum(p > 0.5 for p in pa) / len(pa),  # fraction of orderings answered 'A'
            "mean_p_a": statistics.fmean(pa),
            "answer_token_mass": statistics.fmean(r["judge_mass"] for r in js),
            "prior_logodds_a": js[0].get("judge_prior_logodds"),
        }
        jl = [r for r in js if r.get("human_label")]
        if jl:
            out["text_judge"]["accuracy"] = _accuracy([r["judge_score"] for r in jl])
            out["text_judge"]["accuracy_calibrated"] = _accuracy([r["judge_score_calibrated"] for r in jl])
    if labelled:
        out["labelled"] = len(labelled)
    return out


def _per_token(r: dict) -> float:
    """Length-normalised R: each response's log-ratio divided by its token count."""
    if float(r["self_reward"]) == 0.0 and not (r.get("chosen_tokens") and r.get("rejected_tokens")):
        return 0.0
    nc, nr = max(1, int(r.get("chosen_tokens") or 1)), max(1, int(r.get("rejected_tokens") or 1))
    if not str(r.get("chosen", "x")).strip() or not str(r.get("rejected", "x")).strip():
        return 0.0
    return (r["lp_chosen_pos"] - r["lp_chosen_neg"]) / nc - (r["lp_rejected_pos"] - r["lp_rejected_neg"]) / nr


# -- files -------------------------------------------------------------------------------
def _runs_mixed(precision: str, model) -> bool:
    """Whether score_pairs runs `precision` as mixed on this model (mixed needs float32 weights)."""
    return precision == "mixed" and _dtype_name(model) == "float32"


def scoring_precision(precision: str, model_cfg: ModelConfig) -> tuple[str, str]:
    """(precision, dtype to load the model in) for `--precision auto` and the rest.

    auto: on a GPU that runs bf16, with --dtype auto, "mixed" over float32 weights: the bf16
    body gives the speed, and near-ties are recomputed in float32, because a bf16 model flips
    the sign of R on ~9% of generated pairs (benchmarks/score.py), against the >= 99.5% the
    GPU path must keep. Everywhere else "exact" in the model's dtype (float32 on a CPU: the
    default run's numbers are unchanged)."""

    if precision != "auto":
        return precision, model_cfg.dtype
    device = resolve_device(model_cfg.device)
    if model_cfg.dtype == "auto" and device.type != "cpu" and bf16_supported(device):
        return "mixed", "float32"
    return "exact", model_cfg.dtype


def score_file(model_cfg: ModelConfig, cfg: ScoreConfig, data: str, out: str, *, sampling: SamplingConfig | None = None,
               model=None, tokenizer=None, progress: bool = True, summary_path: str | None = None,
               where: Where | None = None) -> dict:
    """Score a pair file into `out` (JSONL, resumable), returning the summary of the whole output.

    From `sampling` (default SamplingConfig()): max_context, the longest context + response scored (longer
    contexts are cut from the left and counted), and response_tokens, whose openings' reference log-probs
    are stored with the whole responses' (training on openings reuses them).

    Records already in `out` are skipped; the summary covers them too, so a resumed run
    reports the same numbers as an uninterrupted one. summary_path, when set, gets a copy.
    `where`: the cfg.report_to trackers' run (default: beside `out`).
    """
    from tqdm.auto import tqdm

    judge = JUDGE_ALIASES.get(cfg.judge, cfg.judge)
    if judge not in JUDGES:
        raise DlmaError(f"unknown judge {cfg.judge!r}; choose from {', '.join(JUDGES)}")
    pairs = read_pairs(data, cfg.limit)
    if not pairs:
        raise DlmaError(f"{data}: no pairs")
    check_not_input(out, [Path(f) for f in named_files(data)])
    sampling = sampling or SamplingConfig()
    max_context, response_tokens = sampling.max_context, sampling.response_tokens
    precision, load_dtype = scoring_precision(cfg.precision, model_cfg)
    if model is not None and not _runs_mixed(precision, model):
        precision = "exact"  # a caller's bf16 model: what score_pairs computes, so what the file records
    # preset files by content: one edited since scores otherwise
    preset_files = file_hashes(cfg.preset or ",".join(sorted({str(pair_preset(p)) for p in pairs if p.get("preset")})))
    writer = JsonlWriter(out, settings={  # what shapes the records: another value must not append to this file
        "model": model_cfg.model, "dtype": model_cfg.dtype, "judge": judge, "preset": cfg.preset,
        "reference": cfg.reference, "precision": precision, "max_context": max_context,
        **({"ensemble": True} if cfg.ensemble else {}),
        **({"response_tokens": response_tokens} if cfg.reference and response_tokens else {}),
        **({"preset_files": preset_files} if preset_files else {})})
    stats: dict = {"empty_responses": 0, "reused_generation_logprobs": 0, "contexts_truncated": 0}
    t0 = time.time()
    try:
        by_id = {p["id"]: p for p in pairs}
        check_same_inputs(writer, lambda rec: (rec.get("id"), _pair_input(rec)),
                          lambda i: _pair_input(by_id[i]) if i in by_id else None, data)
        upgrade_before_append(writer)
        todo = [p for p in pairs if p["id"] not in writer.done]
        if todo:
            if model is None:
                model, tokenizer = load_model(model_cfg.model, load_dtype, model_cfg.device, attn=model_cfg.attn_implementation)
            bar = tqdm(total=len(todo), desc=f"score ({judge})", unit="pair", disable=not progress, dynamic_ncols=True)
            chunk = max(cfg.batch_size * 4, 16)
            done = 0
            # Without --preset, each pair is scored under the preset that generated it
            # (a run may mix sources, e.g. harmful prompts under `harmless`, benign ones under `helpful`).
            by_preset: dict[str | None, list[dict]] = {}
            for rec in pairs:
                by_preset.setdefault(cfg.preset or pair_preset(rec), []).append(rec)
            work = [(_resolve_preset(name, recs), group) for name, recs in by_preset.items()
                    for group in resume_chunks(recs, chunk, lambda r: r["id"] not in writer.done)]
            for preset, group in work:
                if judge in ("self-reward", "both") and cfg.ensemble:
                    group = score_ensemble(model, tokenizer, preset, group, batch_size=cfg.batch_size,
                                           reference=cfg.reference, max_context=max_context,
                                           response_tokens=response_tokens,
                                           precision=precision, model_name=model_cfg.model, stats=stats)
                elif judge in ("self-reward", "both"):
                    group = score_pairs(model, tokenizer, preset, group, batch_size=cfg.batch_size, reference=cfg.reference,
                                        response_tokens=response_tokens,
                                        reuse_generation=cfg.reuse_generation, max_context=max_context,
                                        precision=precision, model_name=model_cfg.model, stats=stats)
                if judge in ("text", "both"):
                    group = judge_pairs(model, tokenizer, preset, group, batch_size=cfg.batch_size, max_context=max_context)
                new = [rec for rec in group if rec["id"] not in writer.done]
                for rec in new:
                    writer.write(conversational(rec))
                done += len(new)
                bar.update(len(new))
                bar.set_postfix(pairs_per_s=f"{done / max(time.time() - t0, 1e-9):.2f}")
            bar.close()
    finally:
        writer.close()
    if stats.get("positions"):  # the positions the model computed (shared prefixes once)
        stats["model_flops"] = forward_flops(model, stats["positions"], stats.get("head_positions", 0))
    records = read_pairs(str(out))
    summary = summarize_scores(records)
    summary.update(judge=judge, already_done=len(pairs) - len(todo), scored=len(todo), output=str(out),
                   seconds=round(time.time() - t0, 2), **stats)
    if todo:
        summary["pairs_per_s"] = round(len(todo) / max(time.time() - t0, 1e-9), 3)
    if summary_path:
        write_json(summary_path, summary)
    if cfg.report_to:
        with Tracking(cfg.report_to, where or Where.beside(out, "score", file=True), "score",
                      typed_settings(model=model_cfg, score=cfg, sampling=sampling), model_cfg.device) as tracking:
            track_scores(tracking, records, summary)
    return summary


def track_scores(tracking: Tracking, records: list[dict], summary: dict) -> None:
    """R's histogram and quantiles, the share with R > 0, each preset's contrast rate, accuracy on
    human labels and throughput, at step = pairs in the file."""
    step = len(records)
    rs = [float(r["self_reward"]) for r in records if r.get("self_reward") is not None]
    tracking.histogram("score/self_reward", rs, step=step)
    sr = summary.get("self_reward") or {}
    values = {f"score/self_reward_{k}": v for k, v in (sr.get("quantiles") or {}).items()}
    values.update({"score/self_reward_mean": sr.get("mean"), "score/self_reward_positive": sr.get("fraction_positive"),
                   "score/accuracy": summary.get("accuracy"), "score/pairs_per_s": summary.get("pairs_per_s"),
                   "score/contexts_truncated": summary.get("contexts_truncated")})
    values.update({f"score/contrast/{name}": c["rate"] for name, c in contrast(records).items()})
    tracking.log({k: v for k, v in values.items() if v is not None}, step=step)
