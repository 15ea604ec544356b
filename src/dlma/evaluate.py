"""Did alignment work? Answers of the aligned model and a baseline, judged and measured.

`evaluate_models` answers held-out prompts with both models under the bare context (what
deployment uses), then measures:

- judges: win / tie / lose of aligned vs baseline for each `--judge` (see `dlma.judges`);
- the attribute: how often each model's answers show the preset's attribute, by the preset's
  detector (`dlma.detectors`), with 95% Wilson intervals;
- harmlessness without a judge: refusal rate on prompts labelled `unsafe` and over-refusal
  on prompts labelled `safe` (`dlma.refusal`);
- text quality: perplexity of each model's answers under a reference model (default: the
  baseline), mean length, distinct-1/2, fraction of empty and of truncated answers;
- self-reward reliability (with `--pairs`): accuracy of the probability judge (R > 0) and of
  the text judge (the base model asked "A or B?", as RLAIF does) on human-labelled pairs;
- training curves, when the aligned model's directory holds the trainer's metrics.jsonl.

Answers are cached in OUT/answers-{aligned,baseline}.jsonl and judge verdicts in
OUT/verdicts-JUDGE.jsonl, so a rerun regenerates and rejudges nothing. Answers are greedy by
default; with a temperature they are sampled, the two models from different seed streams
(so a model compared with itself gives two independent samples, not two copies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import Decoding, EvalConfig, ModelConfig, SamplingConfig, to_dict
from .data import (PHRASINGS, JsonlWriter, PromptRecord, iter_jsonl, load_eval_prompts, read_pairs, release_lock,
                   resume_chunks, take_lock)
from .detectors import attribute_rate, for_preset
from .errors import DlmaError
from .generate import SAMPLER, SamplingParams, TransformersBackend, row_seed
from .judges import (Item, OpenAIJudge, RewardModelJudge, SelfRewardJudge, TextJudge, Verdict, judge_slug,
                     parse_judge_spec, summarize_verdicts)
from .logprobs import score_trees
from .models import load_model
from .prompts import Preset, Renderer, context_room, load_preset
from .refusal import is_refusal, refusal_rates
from .report import judge_table, quality_table, write_report
from .reward import summarize_scores
from .stages import FALLBACK_EVAL_PRESET
from .tracking import Tracking, Where, typed_settings

ROLES = ("aligned", "baseline")
TRAINING_FIELDS = ("step", "loss", "reward_margin", "reward_accuracy", "lr", "tokens_per_s")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


# -- models, loaded once each ----------------------------------------------------------
class ModelPool:
    """Loads each named model once and hands the same (model, tokenizer) to every user."""

    def __init__(self, model_cfg: ModelConfig, preloaded: dict[str, tuple] | None = None):
        self.cfg = model_cfg
        self.models: dict[str, tuple] = dict(preloaded or {})

    def get(self, name: str) -> tuple:
        if name not in self.models:

            self.models[name] = load_model(name, self.cfg.dtype, self.cfg.device, attn=self.cfg.attn_implementation)
        return self.models[name]

    def release(self, name: str) -> None:
        if self.models.pop(name, None) is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- answers ----------------------------------------------------------------------------
def generate_answers(model, tok, prompts: Sequence[PromptRecord], cfg: EvalConfig, preset: Preset, path: Path, *,
                     role: str, model_name: str, progress: bool = True,
                     decoding: Decoding = SamplingConfig().answers) -> tuple[dict[str, dict], int]:
    """Answer every prompt under the bare context, decoded as `decoding` says (sampling.answers);
    cached in `path` (JSONL, resumable).

    Returns {prompt id: answer record} and how many answers were generated now (not cached)."""
    from tqdm.auto import tqdm

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")  # bf16 and float32 answer differently
    d = decoding
    settings = {"model": model_name, "dtype": dtype, "max_new_tokens": d.max_new_tokens, "temperature": d.temperature,
                "top_p": d.top_p, "seed": cfg.seed, "max_context": d.max_context, "preset_placement": preset.placement,
                **({"sampler": SAMPLER} if d.temperature > 0 else {})}
    have: dict[str, dict] = {}
    asked = {p.id: p.prompt for p in prompts}
    if path.exists():
        for lineno, rec in iter_jsonl(path):
            if rec.get("generation") != settings:
                raise DlmaError(f"{path}:{lineno}: cached answers were made with other settings "
                                f"({rec.get('generation')} vs {settings}); choose another --out or delete the file")
            if rec.get("prompt") == asked.get(rec["id"]):  # an answer to a prompt edited since is answered again
                have[rec["id"]] = rec
    todo = [p for p in prompts if p.id not in have]
    if todo:
        backend = TransformersBackend(model, tok, cfg.batch_size)
        renderer = Renderer(tok, preset, max_context=context_room(d.max_context, d.max_new_tokens))
        params = SamplingParams(d.max_new_tokens, d.temperature, d.top_p, cfg.seed)
        bar = tqdm(total=len(todo), desc=f"answers ({role})", unit="prompt", disable=not progress, dynamic_ncols=True)
        with JsonlWriter(path) as writer:
            for group in resume_chunks(prompts, cfg.batch_size, lambda p: p.id not in have):
                fresh = sum(p.id not in have for p in group)
                samples = backend.sample([renderer.context_ids(p.prompt, "bare") for p in group], params,
                                         seeds=[row_seed(cfg.seed, role, p.id) for p in group])
                for p, s in zip(group, samples):
                    if p.id in have:  # computed again only so that the rest shares an uninterrupted run's batch
                        continue
                    rec = {"id": p.id, "prompt": p.prompt, "label": p.label, "source": p.extra.get("source"),
                           "answer": tok.decode(s.ids, skip_special_tokens=True), "truncated": not s.finished,
                           "tokens": len(s.ids), "generation": settings}
                    writer.write(rec)
                    have[p.id] = rec
                bar.update(fresh)
        bar.close()
    return {p.id: have[p.id] for p in prompts}, len(todo)


def sampled_refusals(model_tok: tuple, prompts: Sequence[PromptRecord], cfg: EvalConfig, preset: Preset, out: Path, *,
                     role: str, model_name: str, decoding: Decoding, progress: bool = True) -> dict:
    """Refusal and over-refusal over `cfg.samples` sampled answers per prompt (T = --sample-temperature).

    Samples of one prompt are not independent, so the interval is over prompts: the mean of the
    per-prompt refusal fractions +- 1.96 standard errors (clipped to [0, 1]).
    """
    model, tok = model_tok
    fractions: dict[str, list[float]] = {"unsafe": [], "safe": []}
    runs = []
    for s in range(cfg.samples):
        scfg = dataclasses.replace(cfg, seed=cfg.seed + 1 + s)
        got, _ = generate_answers(model, tok, prompts, scfg, preset, out / f"answers-{role}-sample{s + 1}.jsonl",
                                  role=role, model_name=model_name, progress=progress,
                                  decoding=decoding._replace(temperature=cfg.sample_temperature, top_p=1.0))
        runs.append(got)
    for p in prompts:
        if p.label in fractions:
            fractions[p.label].append(statistics.fmean(is_refusal(r[p.id]["answer"]) for r in runs))

    def summary(xs: list[float]) -> tuple[float | None, list[float] | None]:
        if not xs:
            return None, None
        m = statistics.fmean(xs)
        half = 1.96 * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 1.0
        return m, [max(0.0, m - half), min(1.0, m + half)]

    (r, r_ci), (o, o_ci) = summary(fractions["unsafe"]), summary(fractions["safe"])
    return {"refusal_rate": r, "refusal_ci": r_ci, "n_unsafe": len(fractions["unsafe"]),
            "over_refusal_rate": o, "over_refusal_ci": o_ci, "n_safe": len(fractions["safe"])}


def _copy_answers(answers: dict[str, dict], path: Path) -> dict[str, dict]:
    with JsonlWriter(path) as writer:
        for rec in answers.values():
            if rec["id"] not in writer.done:
                writer.write(rec)
    return dict(answers)


# -- text quality ----------------------------------------------------------------------
def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique word n-grams / all word n-grams over all answers (lowercased, whitespace words)."""
    total, unique = 0, set()
    for t in texts:
        words = t.lower().split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else None


def answer_logprobs(model, tok, preset: Preset, prompts: Sequence[PromptRecord], answers: Sequence[dict[str, dict]],
                    cfg: EvalConfig, max_context: int) -> list[dict[str, tuple[float, int]]]:
    """Per answer set, {prompt id: (summed log-prob, tokens)} of each answer under `model` (bare context,
    EOS included when the answer ended); an empty cut answer has no token to score and is left out.

    Every set answers the same prompts, so each context is laid out once with one branch per set, and
    the system turn all contexts share is computed once (`score_trees`)."""
    r = Renderer(tok, preset, max_context=max_context)
    trees, where = [], []
    for p in prompts:
        branches = [(k, r.response_ids(a[p.id]["answer"], truncated=a[p.id]["truncated"])) for k, a in enumerate(answers)]
        branches = [(k, ids) for k, ids in branches if ids]
        if branches:
            trees.append((r.context_ids(p.prompt, "bare"), [ids for _, ids in branches]))
            where.append((p.id, [k for k, _ in branches]))
    scored = score_trees(model, trees, pad_id=tok.pad_token_id, batch_size=cfg.batch_size)
    out: list[dict[str, tuple[float, int]]] = [{} for _ in answers]
    for (pid, ks), res in zip(where, scored):
        for k, (lp, n) in zip(ks, res):
            out[k][pid] = (lp, n)
    return out


def perplexities(scored: dict[str, tuple[float, int]], ids: Sequence[str]) -> tuple[list[float], float]:
    """Per-answer perplexities of the scored answers among `ids`, and their token-weighted corpus perplexity."""
    got = [scored[i] for i in ids if i in scored]
    per = [math.exp(-s / c) for s, c in got]
    return per, math.exp(-sum(s for s, _ in got) / max(sum(c for _, c in got), 1))


SHORT_WORDS = 5  # an answer shorter than this many words says little (a terse reply, a bare refusal)


def quality_metrics(answers: dict[str, dict], per_ppl: list[float], corpus_ppl: float) -> dict:
    texts = [a["answer"] for a in answers.values()]
    n = len(texts)
    words = sorted(len(t.split()) for t in texts)
    return {
        "words_p10": words[n // 10], "words_median": statistics.median(words), "words_p90": words[(9 * n) // 10],
        "short_fraction": sum(w < SHORT_WORDS for w in words) / n,
        "n": n,
        "mean_tokens": statistics.fmean(a["tokens"] for a in answers.values()),
        "mean_words": statistics.fmean(len(t.split()) for t in texts),
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "empty_fraction": sum(not t.strip() for t in texts) / n,
        "truncated_fraction": sum(a["truncated"] for a in answers.values()) / n,
        "perplexity": corpus_ppl,
        "perplexity_median": statistics.median(per_ppl) if per_ppl else None,
    }


def phrasing_rates(prompts: Sequence[PromptRecord], answers: dict[str, dict[str, dict]]) -> dict | None:
    """Refusal and over-refusal per phrasing of the requests (prompts that carry `phrasing`), for
    each role, with the mean over phrasings and the worst one; None where no prompt has a phrasing.

    The same requests are asked in every phrasing, so the spread between phrasings is the model
    reacting to the form of a request rather than to its meaning."""
    have = [p.extra.get("phrasing") for p in prompts]
    order = [ph for ph in PHRASINGS if ph in have] + sorted({h for h in have if h and h not in PHRASINGS})
    if not order:
        return None
    groups = {ph: [p for p in prompts if p.extra.get("phrasing") == ph] for ph in order}
    originals = [p for p in prompts if p.extra.get("original")]
    if originals:
        groups["original wording"] = originals
    rates = {g: {role: refusal_rates([answers[role][p.id]["answer"] for p in ps], [p.label for p in ps]) for role in ROLES}
             for g, ps in groups.items()}
    summary = {}
    for role in ROLES:
        summary[role] = {}
        for key, worst in (("refusal_rate", min), ("over_refusal_rate", max)):
            vals = {ph: rates[ph][role][key] for ph in order if rates[ph][role].get(key) is not None}
            if vals:
                pick = worst(vals, key=vals.get)
                summary[role][key] = {"mean": statistics.fmean(vals.values()), "worst": vals[pick], "worst_phrasing": pick}
    return {"phrasings": order, "rates": rates, "summary": summary}


def attribute_rates(preset: Preset, prompts: Sequence[PromptRecord], answers: dict[str, dict[str, dict]]) -> dict | None:
    """How often each model's answers show the preset's attribute, by its detector, over all prompts,
    with 95% Wilson intervals; None where the preset has no detector or a refusal one (those are
    the refusal rates, measured on labelled prompts)."""
    shows = for_preset(preset)
    if shows is None or shows.by_label:
        return None
    return {"preset": preset.name, "attribute": preset.attribute, "detector": shows.description,
            **{role: attribute_rate([(answers[role][p.id]["answer"], answers[role][p.id]["truncated"]) for p in prompts], shows)
               for role in ROLES}}


# -- judges ------------------------------------------------------------------------------
def build_judge(spec: str, pool: ModelPool, baseline: str, preset: Preset, cfg: EvalConfig, out: Path, max_context: int):
    kind, name = parse_judge_spec(spec)
    if kind == "self-reward":
        model, tok = pool.get(baseline)
        return SelfRewardJudge(model, tok, preset, batch_size=cfg.batch_size, max_context=max_context)
    if kind == "llm":
        model, tok = pool.get(name)
        return TextJudge(model, tok, preset.judge_question, name=spec, batch_size=max(1, cfg.batch_size // 2),
                        max_context=max(max_context, 2048))
    if kind in ("reward", "cost"):
        return RewardModelJudge(name, cost=kind == "cost", device=pool.cfg.device, dtype=pool.cfg.dtype)
    return OpenAIJudge(name, preset.judge_question, cfg.judge_cache or out / "judge-cache.jsonl",
                       timeout=cfg.judge_timeout, retries=cfg.judge_retries, rate=cfg.judge_rate,
                       concurrency=cfg.judge_concurrency)


def _verdict_key(spec: str, preset: Preset, it: Item) -> str:
    blob = json.dumps([spec, preset.name, preset.judge_question, it.prompt, it.aligned, it.baseline,
                       it.aligned_truncated, it.baseline_truncated], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_judge(spec: str, items: Sequence[Item], pool: ModelPool, baseline: str, preset: Preset, cfg: EvalConfig,
              out: Path, max_context: int, progress: bool = True) -> list[Verdict]:
    """Verdicts for every item, reusing OUT/verdicts-JUDGE.jsonl; failed items are not cached (a rerun retries them)."""
    path = out / f"verdicts-{judge_slug(spec)}.jsonl"
    cached: dict[str, Verdict] = {}
    if path.exists():
        for _, rec in iter_jsonl(path):
            detail = {k: v for k, v in rec.items() if k not in ("id", "judge", "outcome", "key")}
            cached[rec["key"]] = Verdict(rec["id"], rec["outcome"], detail)
    keys = {it.id: _verdict_key(spec, preset, it) for it in items}
    todo = [it for it in items if keys[it.id] not in cached]
    fresh: dict[str, Verdict] = {}
    if todo:
        _log(progress, f"judge {spec}: {len(todo)} item(s) ({len(items) - len(todo)} cached)")
        judge = build_judge(spec, pool, baseline, preset, cfg, out, max_context)
        try:
            verdicts = judge.judge(todo)
        finally:
            if hasattr(judge, "cache"):
                judge.cache.close()
        with JsonlWriter(path, key="key") as writer:
            for it, v in zip(todo, verdicts):
                fresh[it.id] = v
                if v.outcome != "failed":
                    writer.write({"key": keys[it.id], **v.to_record(spec)})
    return [fresh.get(it.id) or cached[keys[it.id]] for it in items]


def judge_note(spec: str) -> str:
    kind, _ = parse_judge_spec(spec)
    return {
        "self-reward": "the base model's contrastive probability judge: the same signal that trained a DLMA model",
        "llm": "a causal LM read as a pairwise judge (next-token probability of A vs B), position-swapped",
        "reward": "a reward model scoring each answer alone",
        "cost": "a cost model scoring each answer alone (lower cost wins)",
        "openai": "a chat model behind an OpenAI-compatible API, position-swapped, replies cached",
    }[kind]


# -- self-reward reliability --------------------------------------------------------------
def reliability(pool: ModelPool, baseline: str, preset: Preset, cfg: EvalConfig,
                max_context: int = SamplingConfig().max_context, progress: bool = True) -> dict:
    """Accuracy of the probability judge (R > 0) and of the text judge on human-labelled pairs."""
    pairs = read_pairs(cfg.pairs, cfg.pairs_limit)
    if not pairs:
        raise DlmaError(f"{cfg.pairs}: no pairs")
    _log(progress, f"self-reward reliability on {len(pairs)} pair(s) of {cfg.pairs}")
    model, tok = pool.get(baseline)
    rs = SelfRewardJudge(model, tok, preset, batch_size=cfg.batch_size, max_context=max_context).rewards(pairs)
    # The text judge is the one that labels RLAIF's pairs (TextJudge.score_pairs), so this is
    # the accuracy of the labels the rlaif baseline trains on.
    judged = TextJudge(model, tok, preset.judge_question, name="text-judge",
                       batch_size=max(1, cfg.batch_size // 2)).score_pairs(pairs)
    correct = sum(r > 0 for r in rs) + 0.5 * sum(r == 0 for r in rs)
    out = {"pairs": cfg.pairs, "n": len(pairs), "judge_model": baseline,
           "human_labelled": sum(bool(p.get("human_label")) for p in pairs),
           "self_reward_accuracy": correct / len(rs),
           "self_reward_mean": statistics.fmean(rs)}

    out["text_judge"] = summarize_scores(judged)["text_judge"]
    out["text_judge_accuracy"] = out["text_judge"].get("accuracy")
    out["self_reward_values"] = rs
    return out


# -- training curves ------------------------------------------------------------------------
def training_curves(model: str) -> dict | None:
    """The trainer's metrics.jsonl in the model directory, as columns; None when absent."""
    path = Path(model) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [rec for _, rec in iter_jsonl(path) if "step" in rec and "loss" in rec]
    if not rows:
        return None
    return {f: [rec.get(f) for rec in rows] for f in TRAINING_FIELDS}


# -- the whole evaluation -------------------------------------------------------------------------
def _examples(prompts: Sequence[PromptRecord], answers: dict[str, dict[str, dict]], verdicts: dict[str, list[Verdict]],
              k: int) -> list[dict]:
    """Up to k prompts, taken round-robin over sources (and labels) so each kind is shown."""
    groups: dict[tuple, list[PromptRecord]] = {}
    for p in prompts:
        groups.setdefault((p.extra.get("source"), p.label), []).append(p)
    chosen: list[PromptRecord] = []
    lists = list(groups.values())
    while len(chosen) < k and any(lists):
        for lst in lists:
            if lst and len(chosen) < k:
                chosen.append(lst.pop(0))
    by_judge = {spec: {v.id: v.outcome for v in vs} for spec, vs in verdicts.items()}
    return [{"id": p.id, "prompt": p.prompt, "label": p.label, "source": p.extra.get("source"),
             **{role: answers[role][p.id]["answer"] for role in ROLES},
             "refused": {role: is_refusal(answers[role][p.id]["answer"]) for role in ROLES},
             "verdicts": {spec: by_judge[spec][p.id] for spec in by_judge}} for p in chosen]


def evaluate_models(model_cfg: ModelConfig, cfg: EvalConfig, out_dir: str, *, model: str, baseline: str = "embedded",
                    sampling: SamplingConfig | None = None, progress: bool = True, preloaded: dict[str, tuple] | None = None,
                    where: Where | None = None) -> dict:
    """Evaluate `model` (aligned) against `baseline`; write OUT/metrics.json and the report; return the metrics.

    sampling: the answers' decoding (sampling.answers) and the context cut (default: SamplingConfig()).

    preloaded: {name: (model, tokenizer)} already in memory (tests, the pipeline) to reuse.
    where: the cfg.report_to trackers' run (default: OUT/tensorboard/evaluate-OUT).
    One evaluation writes an OUT at a time (its lock): a second one is refused at once.
    """
    out = Path(out_dir)
    lock = take_lock(out / ".lock", lambda holder: f"{out} is in use by another dlma evaluate ({holder}); "
                     "wait for it or choose another --out")
    try:
        return _evaluate(model_cfg, cfg, (sampling or SamplingConfig()).answers, out, model=model, baseline=baseline,
                         progress=progress, preloaded=preloaded, where=where)
    finally:
        release_lock(lock)


def _evaluate(model_cfg: ModelConfig, cfg: EvalConfig, dec: Decoding, out: Path, *, model: str, baseline: str, progress: bool,
              preloaded: dict[str, tuple] | None, where: Where | None) -> dict:
    t0 = time.time()
    preset = load_preset(cfg.preset or FALLBACK_EVAL_PRESET)
    for spec in cfg.judge:
        parse_judge_spec(spec)  # fail on a typo before any model runs
    prompts = load_eval_prompts(cfg.prompts, cfg.limit)
    _log(progress, f"{len(prompts)} prompt(s) from {cfg.prompts}; aligned={model} baseline={baseline}")
    pool = ModelPool(model_cfg, preloaded)
    reference = cfg.reference or baseline

    answers: dict[str, dict[str, dict]] = {}
    names = {"aligned": model, "baseline": baseline}
    generated: dict[str, int] = {}
    for role in ROLES:
        if role == "baseline" and model == baseline and dec.temperature <= 0:
            # greedy decoding of the same model gives the same answers: copy instead of regenerating
            answers[role], generated[role] = _copy_answers(answers["aligned"], out / f"answers-{role}.jsonl"), 0
            continue
        m, tok = pool.get(names[role])
        answers[role], generated[role] = generate_answers(m, tok, prompts, cfg, preset, out / f"answers-{role}.jsonl",
                                         role=role, model_name=names[role], progress=progress, decoding=dec)
    sampled = {role: sampled_refusals(pool.get(names[role]), prompts, cfg, preset, out, role=role,
                                      model_name=names[role], decoding=dec, progress=progress) for role in ROLES} if cfg.samples > 0 else None
    if model not in (baseline, reference) and not any(spec.partition(":")[2] == model for spec in cfg.judge):
        pool.release(model)

    _log(progress, f"perplexity under {reference}")
    ref_model, ref_tok = pool.get(reference)
    quality, dists, quality_safe = {}, {}, {}
    # Refusals are short and alike, so over all prompts a model that refuses more looks less fluent
    # and less diverse; on harmless prompts (which it should answer) the quality change is its own.
    safe = [p.id for p in prompts if p.label == "safe"]
    same = all(it["answer"] == answers["aligned"][k]["answer"] for k, it in answers["baseline"].items())
    todo = ROLES[:1] if same else ROLES  # same answers: same perplexities
    scored_by = dict(zip(todo, answer_logprobs(ref_model, ref_tok, preset, prompts, [answers[r] for r in todo], cfg, dec.max_context)))
    for role in ROLES:
        scored = scored_by.get(role, scored_by[ROLES[0]])
        per, corpus = perplexities(scored, [p.id for p in prompts])
        quality[role] = quality_metrics(answers[role], per, corpus)
        dists[role] = {"tokens": [answers[role][p.id]["tokens"] for p in prompts], "perplexity": per}
        if safe and len(safe) < len(prompts):
            quality_safe[role] = quality_metrics({i: answers[role][i] for i in safe}, *perplexities(scored, safe))
    labels = [p.label for p in prompts]
    refusal = {role: refusal_rates([answers[role][p.id]["answer"] for p in prompts], labels) for role in ROLES}
    attribute = attribute_rates(preset, prompts, answers)
    by_phrasing = phrasing_rates(prompts, answers)

    items = [Item(p.id, p.prompt, answers["aligned"][p.id]["answer"], answers["baseline"][p.id]["answer"],
                  answers["aligned"][p.id]["truncated"], answers["baseline"][p.id]["truncated"]) for p in prompts]
    verdicts: dict[str, list[Verdict]] = {}
    judges: dict[str, dict] = {}
    for spec in cfg.judge:
        verdicts[spec] = run_judge(spec, items, pool, baseline, preset, cfg, out, dec.max_context, progress)
        judges[spec] = {**summarize_verdicts(verdicts[spec]), "note": judge_note(spec)}
        _log(progress, f"judge {spec}: win {judges[spec]['win']} tie {judges[spec]['tie']} "
                       f"lose {judges[spec]['lose']} failed {judges[spec]['failed']}")
        if spec == "self-reward":
            dists["self_reward"] = [v.detail.get("self_reward") for v in verdicts[spec] if v.outcome != "failed"]

    metrics: dict[str, Any] = {
        "models": {"aligned": model, "baseline": baseline, "reference": reference},
        "settings": {**to_dict(cfg), **dec._asdict(), "model_config": to_dict(model_cfg)},
        "prompts": {"n": len(prompts),
                    "by_source": _count(p.extra.get("source") for p in prompts),
                    "by_label": _count(p.label or "none" for p in prompts),
                    "identical_answers": sum(it.aligned == it.baseline for it in items),
                    "answers_generated": generated},
        "judges": judges,
        "refusal": {**refusal, "detector": "dlma.refusal: refusal phrases in the first two sentences of an answer"},
        **({"attribute": attribute} if attribute else {}),
        **({"phrasing": by_phrasing} if by_phrasing else {}),
        **({"sampled_refusal": {**sampled, "samples": cfg.samples, "temperature": cfg.sample_temperature}} if sampled else {}),
        "quality": quality,
        **({"quality_safe": quality_safe} if quality_safe else {}),
    }
    if cfg.pairs:
        rel = reliability(pool, baseline, preset, cfg, dec.max_context, progress)
        dists["pairs_self_reward"] = rel.pop("self_reward_values")
        metrics["reliability"] = rel
    sel = Path(model) / "selection.json"
    if sel.is_file():  # which training step the model is, and why (train.select_prompts)
        metrics["selection"] = json.loads(sel.read_text())
    curves = training_curves(model)
    if curves:
        metrics["training"] = curves
    metrics["distributions"] = dists
    metrics["examples"] = _examples(prompts, answers, verdicts, cfg.examples)
    metrics["seconds"] = round(time.time() - t0, 2)

    write_report(metrics, out, title=f"dlma evaluation: {model} vs {baseline}")
    _log(progress, f"report: {out / 'index.html'}")
    if cfg.report_to:
        with Tracking(cfg.report_to, where or Where.beside(out, "evaluate", file=False), "evaluate",
                      typed_settings(model=model_cfg, evaluate=cfg, answers=dec._asdict()), model_cfg.device) as tracking:
            track_evaluation(tracking, metrics)
    return metrics


def track_evaluation(tracking: Tracking, metrics: dict) -> None:
    """Refusal rates with their intervals, quality and judges' win rates as scalars, and the
    report's refusal/quality and judge tables as tables."""
    values: dict[str, Any] = {}
    for role in ROLES:
        r, q = (metrics.get("refusal") or {}).get(role) or {}, (metrics.get("quality") or {}).get(role) or {}
        for key in ("refusal_rate", "over_refusal_rate"):
            values[f"evaluate/{role}/{key}"] = r.get(key)
            ci = r.get(key.replace("_rate", "_ci"))
            if ci:
                values[f"evaluate/{role}/{key}_low"], values[f"evaluate/{role}/{key}_high"] = ci
        for key in ("perplexity", "distinct_2", "mean_tokens"):
            values[f"evaluate/{role}/{key}"] = q.get(key)
    for spec, j in (metrics.get("judges") or {}).items():
        values[f"evaluate/win_rate/{spec}"] = j.get("adjusted_win_rate")
    tracking.log({k: v for k, v in values.items() if v is not None}, step=0)
    tracking.table("evaluate/refusal_and_quality", *quality_table(metrics), step=0)
    if metrics.get("judges"):
        tracking.table("evaluate/judges", *judge_table(metrics["judges"]), step=0)


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out
