"""`dlma prompts search`: pick the variant of a preset whose contrast is strongest, honestly.

Candidates are made from the preset itself: as it is, each demonstration set alone, one
demonstration instead of two, instructions without demonstrations and demonstrations without
instructions. Each is checked (`contrast.check_preset`: the same sampling and scoring as
`dlma run`) on a *selection* sample of prompts; the best by the selection metric is then
checked again, beside the preset as it is, on a *report* sample of other prompts. Choosing on
one sample and reporting on another keeps the winner's figure free of its selection luck
(with a handful of candidates on 32 prompts, the best selection score is biased upwards).

Metric: the contrast rate (o+ shows the attribute and o- does not, by the preset's detector)
when the preset names a detector, else R's accuracy on human-labelled pairs (`--pairs`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from .config import CheckConfig, ModelConfig, SamplingConfig
from .contrast import check_preset, format_rate
from .data import read_pairs, read_prompts, write_json
from .errors import DlmaError
from .models import load_model
from .prompts import Preset, load_preset


def preset_to_dict(p: Preset) -> dict:
    """A preset as the YAML mapping `load_preset` reads back."""
    out: dict = {"name": p.name, "description": p.description, "attribute": p.attribute,
                 "judge_question": p.judge_question, "placement": p.placement}
    if p.detector:
        out["detector"] = p.detector
    if p.role != "attribute":
        out["role"] = p.role
    if p.check_prompts:
        out["check_prompts"] = p.check_prompts
    if p.positive_bare:
        out["positive"] = "bare"
    elif p.positive_instruction:
        out["positive"] = {"instruction": p.positive_instruction}
    if p.negative_instruction:
        out["negative"] = {"instruction": p.negative_instruction}
    if p.demonstrations:
        out["demonstrations"] = [[{"user": e.user, "positive": e.positive, "negative": e.negative} for e in group]
                                 for group in p.demonstrations]
        out["demos_per_prompt"] = p.demos_per_prompt
    return out


def candidates(p: Preset) -> list[tuple[str, dict]]:
    """(name, preset mapping) of each variant tried; the first is the preset as it is."""
    base = preset_to_dict(p)
    out = [("as-is", base)]
    if len(p.demonstrations) > 1:
        out += [(f"set-{k + 1}-only", {**base, "demonstrations": [group]}) for k, group in enumerate(base["demonstrations"])]
    if p.demonstrations and p.demos_per_prompt > 1:
        out.append(("one-demonstration", {**base, "demos_per_prompt": 1}))
    if p.demonstrations and p.positive_instruction:
        out.append(("instructions-only", {k: v for k, v in base.items() if k not in ("demonstrations", "demos_per_prompt")}))
        out.append(("demonstrations-only", {k: v for k, v in base.items() if k not in ("positive", "negative")}))
    return out


def _metric(summary: dict) -> tuple[str, dict]:
    if "contrast" in summary:
        return "contrast", summary["contrast"]
    return "accuracy", summary["labelled"]["accuracy"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def search_preset(model_cfg: ModelConfig, preset_name: str, cfg: CheckConfig, out: str, *, progress: bool = True,
                  sampling: SamplingConfig | None = None) -> dict:
    """Check every candidate on the selection sample, the winner and the original on the report sample.

    Writes OUT/best.yaml (the winner, loadable with --preset), OUT/search.json and OUT/search.md.
    """
    preset = load_preset(preset_name)
    if preset.detector is None and not cfg.pairs:
        raise DlmaError(f"preset {preset.name!r} has no detector: pass --pairs (human-labelled pairs) to search by R's accuracy")
    source = cfg.prompts or preset.check_prompts
    if not source:
        raise DlmaError(f"preset {preset.name!r} names no check_prompts; pass --prompts FILE")
    rows = [p for s in source.split(",") if s.strip() for p in read_prompts(s.strip(), 2 * cfg.limit)]
    if len(rows) < 2 * cfg.limit:
        raise DlmaError(f"{source}: {len(rows)} prompts; the search needs 2 x --limit = {2 * cfg.limit} "
                        "(one half to choose, the other to report)")
    out_dir = Path(out)
    samples = {"select": rows[: cfg.limit], "report": rows[cfg.limit: 2 * cfg.limit]}
    for name, sample in samples.items():
        _write_jsonl(out_dir / f"prompts-{name}.jsonl",
                     [{"id": p.id, "prompt": p.prompt, **({"label": p.label} if p.label else {})} for p in sample])
    pair_files: dict[str, str | None] = {"select": None, "report": None}
    if cfg.pairs:
        pairs = read_pairs(cfg.pairs, 2 * cfg.pairs_limit)
        half = len(pairs) // 2
        for name, part in (("select", pairs[:half]), ("report", pairs[half:])):
            _write_jsonl(out_dir / f"pairs-{name}.jsonl", part)
            pair_files[name] = str(out_dir / f"pairs-{name}.jsonl")
    cands = candidates(preset)
    for name, data in cands:
        (out_dir / "candidates").mkdir(parents=True, exist_ok=True)
        (out_dir / "candidates" / f"{name}.yaml").write_text(yaml.safe_dump({**data, "name": f"{preset.name}.{name}"},
                                                                              sort_keys=False, allow_unicode=True))
    model, tok = load_model(model_cfg.model, model_cfg.dtype, model_cfg.device, attn=model_cfg.attn_implementation)

    def check(name: str, sample: str) -> dict:
        c = dataclasses.replace(cfg, prompts=str(out_dir / f"prompts-{sample}.jsonl"),
                                pairs=pair_files[sample] if preset.detector is None else None)
        s = check_preset(model_cfg, str(out_dir / "candidates" / f"{name}.yaml"), c, str(out_dir / sample / name),
                         progress=progress, sampling=sampling, model=model, tokenizer=tok)
        kind, rate = _metric(s)
        return {"candidate": name, "sample": sample, "metric": kind, **rate}

    selection = [check(name, "select") for name, _ in cands]
    best = max(selection, key=lambda r: (r["rate"], r["candidate"] == "as-is"))  # a tie keeps the preset as it is
    report = [check(name, "report") for name in dict.fromkeys(["as-is", best["candidate"]])]
    winner = dict(cands)[best["candidate"]]
    note = (f"# Chosen by `dlma prompts search {preset_name}`: the {best['candidate']} variant, by {best['metric']} on "
            f"{cfg.limit} selection prompts; the report sample's figures are in search.md.\n")
    (out_dir / "best.yaml").write_text(note + yaml.safe_dump({**winner, "name": f"{preset.name}-searched"}, sort_keys=False,
                                                             allow_unicode=True))
    summary = {"preset": preset.name, "prompts": source, "per_sample": cfg.limit, "selection": selection,
               "chosen": best["candidate"], "report": report, "best_yaml": str(out_dir / "best.yaml")}
    write_json(out_dir / "search.json", summary)
    (out_dir / "search.md").write_text(render_search(summary), encoding="utf-8")
    return summary


def render_search(summary: dict) -> str:
    metric = summary["selection"][0]["metric"]
    lines = [f"## `dlma prompts search {summary['preset']}` on {summary['prompts']}", "",
             f"Selection sample ({summary['per_sample']} prompts), {metric}:", "", "| candidate | " + metric + " |", "|---|---|"]
    lines += [f"| {r['candidate']}{' (chosen)' if r['candidate'] == summary['chosen'] else ''} | {format_rate(r)} |"
              for r in summary["selection"]]
    lines += ["", f"Report sample ({summary['per_sample']} other prompts), {metric}:", "", "| candidate | " + metric + " |",
              "|---|---|"]
    lines += [f"| {r['candidate']} | {format_rate(r)} |" for r in summary["report"]]
    lines += ["", f"Written: {summary['best_yaml']} (use it with `--preset`)."]
    return "\n".join(lines) + "\n"
