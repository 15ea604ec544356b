"""`dlma run`: the whole method in one resumable command."""

from __future__ import annotations

import json
import sys

import yaml

from ..config import RUN_INPUTS, RunConfig, apply_overrides, to_dict
from ..errors import DlmaError
from ..recipes import base_config, load_recipe
from .common import add_recipe_options, formatter

STAGES = ("generate", "score", "train", "evaluate")  # the sections that take report_to

HELP = """\
Run DLMA end to end in a run directory:
  generate -> score -> train -> evaluate (-> report), repeated for `rounds`.
Each stage writes RUN_DIR/round-K/STAGE/ and a done.json marker. Rerunning skips finished
stages, resumes a half-finished one, and redoes stages whose settings changed.
RUN_DIR/final-model is the aligned model (transformers format); RUN_DIR/round-K/evaluate/
holds metrics.json and index.html (the report).

Configuration: a recipe (--recipe NAME, default safety; `dlma recipes` lists them), then
--config FILE, then the options below, then --set section.key=value (e.g. --set train.beta=0.2);
--print-config shows the result. Before any model loads, every file, preset and model the run
will read is checked (--check: only that).

Your model, prompts and attribute: --model, --prompts, --preset and --eval-prompts (in YAML the
same keys: model, prompts, preset, eval_prompts). The training terms that keep the model's own
answers attach to presets that declare `role: retain`, so your presets need no --set for them.

examples:
  dlma run                                   # the safety recipe: the embedded model learns to
                                             # refuse harmful requests, not harmless ones (~16 min on 2 CPU cores)
  dlma run --model HuggingFaceTB/SmolLM2-360M-Instruct --prompts mine.jsonl --preset harmless
  dlma run --recipe attribute --prompts train.jsonl --preset my-preset.yaml --eval-prompts test.jsonl
  dlma run --run-dir runs/exp1 --set train.lr=1e-6 --set generate.limit=512
  dlma run --compare dlma,rlcd,context-distillation   # the paper's comparison, one report
  dlma run --recipe one-gpu --model Qwen/Qwen2.5-7B-Instruct   # bigger models: see README
  dlma run --report-to tensorboard --push-to-hub me/smollm2-dlma  # track every stage; publish
"""


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline, resumable", description=HELP, formatter_class=formatter)
    add_recipe_options(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting; repeatable")
    for inp in RUN_INPUTS:
        p.add_argument(inp.flag, dest=inp.yaml_key, metavar=inp.metavar, help=f"{inp.help} (config: {inp.key})")
    p.add_argument("--run-dir", help="run directory (config: run_dir)")
    p.add_argument("--method", help="dlma, rlcd, context-distillation, rlaif or dlma-listwise (config: method)")
    p.add_argument("--rounds", type=int, help="iterations of generate -> score -> train (config: rounds)")
    p.add_argument("--compare", metavar="M1,M2,...", help="run several methods into RUN_DIR/<method>/ with one combined report")
    p.add_argument("--report-to", nargs="*", metavar="TRACKER",
                   help="tensorboard, wandb or none for every stage (config: generate/score/train/evaluate.report_to); "
                        "TensorBoard logs go to RUN_DIR/tensorboard")
    p.add_argument("--push-to-hub", metavar="REPO", help="after the run, upload the final model to REPO and its pairs to "
                                                         "REPO-pairs (as `dlma push`)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    p.add_argument("--check", action="store_true", help="check the configuration (files, presets, models) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def shipped_defaults() -> RunConfig:
    """The run `dlma run` makes with no options: the default recipe."""
    return load_recipe()


def resolve_config(args) -> RunConfig:
    """Recipe (default: safety) <- --config FILE <- named options <- --set overrides."""
    cfg = base_config(args.recipe, args.config)
    keys = [(inp.yaml_key, inp.key) for inp in RUN_INPUTS] + [("run_dir", "run_dir"), ("method", "method"), ("rounds", "rounds")]
    # JSON-quoted: a value is taken as written (a file name is never read as YAML)
    named = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in keys if getattr(args, flag) is not None]
    if args.report_to is not None:
        named += [f"{section}.report_to={','.join(args.report_to) or 'none'}" for section in STAGES]
    return apply_overrides(cfg, named + args.overrides)


def run(args) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        yaml.safe_dump(to_dict(cfg), sys.stdout, sort_keys=False)
        return 0
    from ..preflight import check_run

    for note in check_run(cfg):
        print(f"dlma run: {note}", file=sys.stderr)
    if args.check:
        print(f"dlma run: the configuration checks out ({cfg.generate.prompts} under {cfg.generate.preset}; "
              f"evaluated on {cfg.evaluate.prompts})", file=sys.stderr)
        return 0
    from ..pipeline import Pipeline, compare, format_compare, format_stages, format_table

    progress = not args.no_progress
    if args.compare and args.push_to_hub:
        raise DlmaError("--push-to-hub uploads one run; after --compare push a method's run with "
                        "`dlma push RUN_DIR/METHOD REPO`")
    if args.compare:
        methods = [m.strip() for m in args.compare.split(",") if m.strip()]
        runs = compare(cfg, methods, progress=progress)  # refuses an empty list (`--compare ,`)
        print(format_table(runs[methods[0]], runs))
        print()
        print(format_compare(runs))
        print(f"\nreport: {cfg.run_dir}/report/index.html")
        return 0
    pipe = Pipeline(cfg, progress=progress)
    metrics = pipe.run()
    print(format_stages(pipe.manifest) + "\n")
    print(format_table(metrics))
    print(f"\naligned model: {cfg.run_dir}/final-model")
    print(f"report: {cfg.run_dir}/round-{cfg.rounds}/evaluate/index.html")
    if args.push_to_hub:
        from ..push import push

        pushed = push(cfg.run_dir, args.push_to_hub)
        print(f"pushed: model {pushed['model']}, pairs {pushed['dataset']}")
    return 0
