"""`dlma prompts check`: how strong a preset's contrast is for this model, before any training.

DLMA works only if p+ and p- make the model answer differently in the attribute, and if the
self-rewarding score R ranks the two answers the way a reader would. This samples a pair per
prompt on a small set of the user's prompts (the same generation and scoring code as `dlma run`,
so what it shows is what training would get) and reports:

- how often each side's answer shows the attribute, by the preset's text detector, and the
  contrast: pairs whose o+ shows it and whose o- does not (Wilson intervals);
- R's distribution, how often R > 0, and how often R's sign agrees with the detector on the
  pairs where the detector tells the two answers apart;
- topic leakage: words of the demonstrations that an answer repeats although the query does not
  contain them (a demonstration about fireworks should not make answers talk about fireworks);
- optionally, R's accuracy on a human-labelled pair file (`chosen` preferred by people).
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from pathlib import Path

from .config import CheckConfig, GenerateConfig, ModelConfig, SamplingConfig, ScoreConfig
from .data import read_pairs, read_prompts, write_json
from .detectors import contrasting, for_preset, pair_sides
from .errors import DlmaError
from .generate import generate_pairs, make_backend
from .models import load_model
from .prompts import Preset, load_preset
from .refusal import REFUSAL_PHRASES, rate
from .report import COLORS, png_bytes, pyplot
from .reward import score_file

_WORD = re.compile(r"[a-z][a-z']{3,}")
# Words of four letters or more that any answer may use: not a sign of copying a demonstration.
_COMMON = frozenset("""
about after again also always another answer anything around away back because been before being best
better both came cannot come could does doing done down each even ever every first from gave give going
good have having help here however information into just keep know like make many more most much must
need never next only other over people please question really right said same should since some someone
something sorry sure take than thank thanks that their them then there these they thing things think
this those through time under until very want ways well were what when where which while will with
without would your you're yours it's don't can't i'm won't i'll i've that's there's what's
""".split())


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower().replace("\u2019", "'")))


def demonstration_words(preset: Preset) -> set[str]:
    """Topic words of the preset's demonstrations: their words less common words, refusal
    phrases and the instructions' words (those describe the attribute, not a topic)."""
    words: set[str] = set()
    for group in preset.demonstrations:
        for ex in group:
            words |= _words(ex.user) | _words(ex.positive) | _words(ex.negative)
    attribute = _words(" ".join(REFUSAL_PHRASES)) | _words(preset.positive_instruction or "") \
        | _words(preset.negative_instruction or "")
    return words - _COMMON - attribute


def leaked_words(answer: str, query: str, topic: set[str]) -> set[str]:
    return (_words(answer) & topic) - _words(query)


def summarize_contrast(preset: Preset, records: list[dict]) -> dict:
    """The check's numbers for scored pair records (pure: no model)."""
    n = len(records)
    if not n:
        raise DlmaError("no pairs to check")
    out: dict = {"preset": preset.name, "pairs": n}
    topic = demonstration_words(preset)
    query = lambda r: " ".join(m["content"] for m in r["prompt"])
    for key, side in (("chosen", "positive"), ("rejected", "negative")):
        leaks = [leaked_words(r[key], query(r), topic) for r in records]
        counts = Counter(w for ws in leaks for w in ws)
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]  # ties alphabetically: the same every run
        out[side] = {
            "truncated": rate(sum(bool(r.get(f"{key}_truncated")) for r in records), n),
            "empty": rate(sum(not r[key].strip() for r in records), n),
            "leakage": rate(sum(bool(ws) for ws in leaks), n),
            "leaked_words": [[w, c] for w, c in top],
        }
    shows = for_preset(preset)
    if shows is not None:
        out["detector"] = shows.description
        pos, neg = (list(side) for side in zip(*(pair_sides(shows, r) for r in records)))
        out["positive"]["shows_attribute"] = rate(sum(pos), n)
        out["negative"]["shows_attribute"] = rate(sum(neg), n)
        out["contrast"] = rate(sum(p and not q for p, q in zip(pos, neg)), n)
    rs = [float(r["self_reward"]) for r in records]
    s = sorted(rs)
    out["self_reward"] = {"median": statistics.median(rs), "p10": s[int(0.1 * (n - 1))], "p90": s[int(0.9 * (n - 1))],
                          "positive": rate(sum(x > 0 for x in rs), n)}
    if shows is not None:
        decisive = [(p, r) for p, q, r in zip(pos, neg, rs) if p != q]
        out["self_reward"]["agrees_with_detector"] = rate(sum((r > 0) == p for p, r in decisive), len(decisive))
        good = [r for p, q, r in zip(pos, neg, rs) if p and not q]
        other = [r for p, q, r in zip(pos, neg, rs) if not (p and not q)]
        out["self_reward"]["median_contrasting"] = statistics.median(good) if good else None
        out["self_reward"]["median_other"] = statistics.median(other) if other else None
    return out


def format_rate(r: dict | None) -> str:
    """A rate record ({rate, ci, count, n}) as `12.5% [8-18] (25/200)`; `-` where there is none."""
    if not r or r.get("rate") is None:
        return "-"
    lo, hi = r["ci"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.0f}-{100 * hi:.0f}] ({r['count']}/{r['n']})"


def render_table(summary: dict) -> str:
    """The check as a Markdown table a user can read in a terminal."""
    pos, neg, sr = summary["positive"], summary["negative"], summary["self_reward"]
    rows = []
    if "shows_attribute" in pos:
        rows.append((f"shows the attribute ({summary['detector']})", format_rate(pos["shows_attribute"]),
                     format_rate(neg["shows_attribute"])))
    rows += [("topic leakage from demonstrations", format_rate(pos["leakage"]), format_rate(neg["leakage"])),
             ("leaked words", ", ".join(f"{w} {c}" for w, c in pos["leaked_words"][:5]) or "-",
              ", ".join(f"{w} {c}" for w, c in neg["leaked_words"][:5]) or "-"),
             ("cut at max_new_tokens", format_rate(pos["truncated"]), format_rate(neg["truncated"])),
             ("empty", format_rate(pos["empty"]), format_rate(neg["empty"]))]
    lines = [f"## `dlma prompts check {summary['preset']}` on {summary['prompts']} ({summary['pairs']} pairs)", "",
             "| | o+ (under p+) | o- (under p-) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| pairs | value |", "|---|---|"]
    if "contrast" in summary:
        lines.append(f"| contrast: o+ shows the attribute, o- does not | {format_rate(summary['contrast'])} |")
    lines.append(f"| R median (p10, p90) | {sr['median']:.2f} ({sr['p10']:.2f}, {sr['p90']:.2f}) |")
    lines.append(f"| R > 0 | {format_rate(sr['positive'])} |")
    if "agrees_with_detector" in sr:
        lines.append(f"| R's sign agrees with the detector (pairs it tells apart) | {format_rate(sr['agrees_with_detector'])} |")
        fmt = lambda v: "-" if v is None else f"{v:.2f}"
        lines.append(f"| R median: contrasting pairs / the others | {fmt(sr['median_contrasting'])} / {fmt(sr['median_other'])} |")
    if "labelled" in summary:
        lab = summary["labelled"]
        lines.append(f"| R's accuracy on {lab['source']} (human-preferred side has R > 0) | {format_rate(lab['accuracy'])} |")
    return "\n".join(lines) + "\n"


def plot_contrast(summary: dict, rewards: list[float], contrasting: list[bool] | None) -> bytes:
    """Left: attribute and leakage rates per side; right: R's histogram (split by the detector)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    keys = [k for k in ("shows_attribute", "leakage", "truncated") if k in summary["positive"]]
    x = range(len(keys))
    for off, side, color in ((-0.2, "positive", COLORS["aligned"]), (0.2, "negative", COLORS["baseline"])):
        ax1.bar([i + off for i in x], [100 * summary[side][k]["rate"] for k in keys], width=0.4, color=color,
                label="o+ (p+)" if side == "positive" else "o- (p-)")
    ax1.set_xticks(list(x), [k.replace("_", " ") for k in keys])
    ax1.set_ylabel("% of answers")
    ax1.set_ylim(0, 100)
    ax1.legend(frameon=False)
    if contrasting is None:
        ax2.hist(rewards, bins=30, color=COLORS["aligned"])
    else:
        ax2.hist([[r for r, c in zip(rewards, contrasting) if c], [r for r, c in zip(rewards, contrasting) if not c]],
                 bins=30, stacked=True, color=[COLORS["win"], COLORS["tie"]], label=["contrasting pairs", "others"])
        ax2.legend(frameon=False)
    ax2.axvline(0, color="black", lw=0.8, ls=":")
    ax2.set_xlabel("self-rewarding score R")
    ax2.set_ylabel("pairs")
    return png_bytes(fig)


def check_preset(model_cfg: ModelConfig, preset_name: str, cfg: CheckConfig, out: str, *, progress: bool = True,
                 sampling: SamplingConfig | None = None, model=None, tokenizer=None) -> dict:
    """Sample, score and summarise one pair per prompt under `preset_name`, sampled as generation samples
    (`sampling`, default SamplingConfig()); write the check to `out`.

    Files in out: pairs.jsonl and scored.jsonl (resumable, as in `dlma run`), check.json,
    check.md and check.png; with cfg.pairs also labelled-scored.jsonl.
    """
    preset = load_preset(preset_name)
    prompts = cfg.prompts or preset.check_prompts
    if not prompts:
        raise DlmaError(f"preset {preset.name!r} names no check_prompts; pass --prompts FILE")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if model is None:
        model, tokenizer = load_model(model_cfg.model, model_cfg.dtype, model_cfg.device, attn=model_cfg.attn_implementation)
    tok = tokenizer
    sampling = sampling or SamplingConfig()
    gen = GenerateConfig(prompts=prompts, preset=preset_name, num_pairs=1, seed=cfg.seed, limit=cfg.limit,
                         batch_size=cfg.batch_size, num_samples=cfg.num_samples)
    backend = make_backend("transformers", model_cfg, gen.batch_size, model=model, tokenizer=tok)
    generate_pairs(model_cfg, gen, str(out_dir / "pairs.jsonl"), sampling=sampling, backend=backend, tokenizer=tok,
                   progress=progress)
    score_cfg = ScoreConfig(preset=preset_name, reference=False, batch_size=cfg.batch_size // 2 or 1, ensemble=cfg.ensemble)
    score_file(model_cfg, score_cfg, str(out_dir / "pairs.jsonl"), str(out_dir / "scored.jsonl"), sampling=sampling,
               model=model, tokenizer=tok, progress=progress)
    wanted = {p.id for source in prompts.split(",") if source.strip() for p in read_prompts(source.strip(), cfg.limit)}
    records = [r for r in read_pairs(str(out_dir / "scored.jsonl")) if r["prompt_id"] in wanted]  # a rerun may change --limit
    summary = summarize_contrast(preset, records)
    summary["prompts"] = prompts
    summary["ensemble"] = cfg.ensemble
    summary["num_samples"] = cfg.num_samples
    if cfg.pairs:
        lab = score_file(model_cfg, ScoreConfig(preset=preset_name, reference=False, limit=cfg.pairs_limit,
                                                ensemble=cfg.ensemble), cfg.pairs,
                         str(out_dir / "labelled-scored.jsonl"), model=model, tokenizer=tok, progress=progress)
        if "accuracy" not in lab:
            raise DlmaError(f"{cfg.pairs}: no human-labelled pairs (HH-RLHF dialogues or records with human_label: true)")
        rs = [float(r["self_reward"]) for r in read_pairs(str(out_dir / "labelled-scored.jsonl")) if r.get("human_label")]
        summary["labelled"] = {"source": cfg.pairs, "accuracy": rate(sum(r > 0 for r in rs), len(rs)),
                               "ties": sum(r == 0 for r in rs)}
    shows = for_preset(preset)
    learns = None if shows is None else [contrasting(shows, r) for r in records]
    (out_dir / "check.png").write_bytes(plot_contrast(summary, [r["self_reward"] for r in records], learns))
    summary["seconds"] = round(time.time() - t0, 1)
    summary["files"] = {k: str(out_dir / f) for k, f in (("table", "check.md"), ("plot", "check.png"), ("json", "check.json"))}
    (out_dir / "check.md").write_text(render_table(summary) + "\n![contrast](check.png)\n", encoding="utf-8")
    write_json(out_dir / "check.json", summary)
    return summary
