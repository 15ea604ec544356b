"""Does the self-reward tell good pairs from bad ones? DLMA against RLCD as pairs go wrong.

At 135M nearly every contrastive pair has R > 0, so on the default pairs R only widens a
margin and DLMA and RLCD (plain DPO on the same pairs) train alike. This measures them where R
can matter: a known share of the pairs is turned wrong (`train.noise_flip`: chosen and rejected
swapped, a seeded choice that is the same for every method at a seed), and each method trains
on the same pairs with the same settings and seeds:

    dlma          the paper's loss with the default's R filter (pairs with R < 0 dropped: where it
                  drops pairs, it trains fewer steps)
    dlma-margin   the paper's loss alone (min_reward off): R only through w * clamp(R), on every
                  pair, the same steps as rlcd
    rlcd          DPO on the pairs as they come (no R at all)

Generation, scoring and the untouched model's answers are made once and copied between runs
(`dlma run`'s sibling reuse). Each model is evaluated on the validation split (never the test
split). Runs already in RUN_DIR are kept and counted, so a curve grows by seeds, shares or
variants one call at a time. Writes RUN_DIR/noise-curve.{json,md,png}; the last lines are the table.

    .venv/bin/python scripts/noise_curve.py --run-dir runs/noise [--flips 0,0.1,0.2,0.4] [--seeds 0,1,2]
        [--config my.yaml] [--set evaluate.limit=400 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from dlma.cli.run import shipped_defaults
from dlma.config import apply_overrides, load_yaml
from dlma.pipeline import Pipeline
from dlma.report import COLORS, png_bytes, pyplot

VARIANTS = {"dlma": ("dlma", {}), "dlma-margin": ("dlma", {"min_reward": None}), "rlcd": ("rlcd", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--flips", default="0,0.2,0.4", help="shares of wrong pairs (comma-separated)")
    ap.add_argument("--seeds", default="0,1", help="train seeds (comma-separated)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"which of {', '.join(VARIANTS)}")
    ap.add_argument("--config", help="a `dlma run` YAML config to start from (default: the shipped one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    base = shipped_defaults()
    if args.config:
        base = load_yaml(type(base), args.config, base=base)
    base = apply_overrides(base, ["evaluate.prompts=safety-val", "evaluate.limit=400", *args.overrides])
    if "test" in base.evaluate.prompts:
        sys.exit("the noise curve is a choice-making measurement: evaluate on the validation split, not the test split")
    root = Path(args.run_dir)
    flips = [float(f) for f in args.flips.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    # runs an earlier call finished: their generation, scores and untouched answers are reused, and the
    # table covers them too, so a curve grows by seeds, shares or variants one call at a time
    done: list[Path] = sorted(p.parent for p in root.glob("flip-*/*/seed-*/manifest.json"))
    for flip in flips:
        for name in args.variants.split(","):
            method, train = VARIANTS[name]
            for seed in seeds:
                run_dir = root / f"flip-{flip:g}" / name / f"seed-{seed}"
                cfg = dataclasses.replace(base, method=method, run_dir=str(run_dir),
                                          train=dataclasses.replace(base.train, noise_flip=flip, seed=seed, **train))
                m = Pipeline(cfg, progress=False, siblings=[d for d in done if d != run_dir]).run()
                done.append(run_dir)
                print(json.dumps(row(flip, name, seed, m)), flush=True)
    rows = [row(float(d.parent.parent.name.removeprefix("flip-")), d.parent.name, int(d.name.removeprefix("seed-")),
                json.loads((d / "round-1" / "evaluate" / "metrics.json").read_text()))
            for d in sorted(set(done)) if (d / "round-1" / "evaluate" / "metrics.json").is_file()]
    summary = summarise(rows)
    (root / "noise-curve.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    table = render(summary, base.evaluate.prompts, base.evaluate.limit, sorted({r["seed"] for r in rows}))
    (root / "noise-curve.md").write_text(table + "\n")
    (root / "noise-curve.png").write_bytes(plot(summary))
    print(table)


def row(flip: float, variant: str, seed: int, m: dict) -> dict:
    """One trained model's line of the curve, from its evaluation's metrics."""
    ref = m["refusal"]["aligned"]
    ph = (m.get("phrasing") or {}).get("summary", {}).get("aligned", {})
    return {"flip": flip, "variant": variant, "seed": seed, "refusal": ref["refusal_rate"],
            "over_refusal": ref["over_refusal_rate"], "balanced": ref["refusal_rate"] - ref["over_refusal_rate"],
            "worst_phrasing_refusal": (ph.get("refusal_rate") or {}).get("worst"),
            "perplexity_safe": (m.get("quality_safe") or {}).get("aligned", {}).get("perplexity")}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for flip in sorted({r["flip"] for r in rows}):
        for name in dict.fromkeys(r["variant"] for r in rows):
            rs = [r for r in rows if r["flip"] == flip and r["variant"] == name]
            if not rs:
                continue
            entry = {"flip": flip, "variant": name, "seeds": len(rs)}
            for key in ("refusal", "over_refusal", "balanced"):
                xs = [r[key] for r in rs]
                entry[key] = statistics.fmean(xs)
                entry[key + "_sd"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
            out.append(entry)
    return out


def render(summary: list[dict], prompts: str, limit: int | None, seeds: list[int]) -> str:
    lines = [f"Wrong pairs vs method ({prompts}, {limit} prompts, train seeds {', '.join(map(str, seeds))}; "
             "mean (sd) over seeds)", "",
             "| wrong pairs | method | harmful refused | harmless refused | balanced |", "|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {100 * e['flip']:.0f}% | {e['variant']} | {100 * e['refusal']:.1f}% ({100 * e['refusal_sd']:.1f}) | "
                     f"{100 * e['over_refusal']:.1f}% ({100 * e['over_refusal_sd']:.1f}) | "
                     f"{100 * e['balanced']:.1f} ({100 * e['balanced_sd']:.1f}) |")
    return "\n".join(lines)


def plot(summary: list[dict]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    colours = {"dlma": COLORS["aligned"], "dlma-margin": COLORS["win"], "rlcd": COLORS["baseline"]}
    for name in dict.fromkeys(e["variant"] for e in summary):
        pts = [e for e in summary if e["variant"] == name]
        ax.errorbar([100 * e["flip"] for e in pts], [100 * e["balanced"] for e in pts],
                    yerr=[100 * e["balanced_sd"] for e in pts], marker="o", capsize=3, label=name, color=colours.get(name))
    ax.set_xlabel("wrong pairs (%)")
    ax.set_ylabel("harmful refused - harmless refused")
    ax.legend(frameon=False)
    return png_bytes(fig)


if __name__ == "__main__":
    main()
