"""`dlma run`: the whole method in one resumable command."""

from __future__ import annotations

import sys
from importlib import resources

import yaml

from ..config import RunConfig, apply_overrides, from_dict, load_yaml, to_dict
from ..errors import DlmaError
from .common import formatter

DEFAULT_CONFIG = "default.yaml"
STAGES = ("generate", "score", "train", "evaluate")  # the sections that take report_to

HELP = """\
Run DLMA end to end in a run directory:
  generate -> score -> train -> evaluate (-> report), repeated for `rounds`.
Each stage writes RUN_DIR/round-K/STAGE/ and a done.json marker. Rerunning skips finished
stages, resumes a half-finished one, and redoes stages whose settings changed.
RUN_DIR/final-model is the aligned model (transformers format); RUN_DIR/round-K/evaluate/
holds metrics.json and index.html (the report).

Configuration: the shipped defaults (see --print-config), then --config FILE, then the
options below, then --set section.key=value (e.g. --set train.beta=0.2).

examples:
  dlma run                                   # the default: the embedded model learns to refuse harmful
                                             # requests, not harmless ones (~20 min on a CPU)
  dlma run --run-dir runs/exp1 --set train.lr=1e-6 --set generate.limit=512
  dlma run --compare dlma,rlcd,context-distillation   # the paper's comparison, one report
  dlma run --model Qwen/Qwen2.5-7B-Instruct --config my.yaml   # bigger models: see README
  dlma run --report-to tensorboard --push-to-hub me/smollm2-dlma  # track every stage; publish
"""


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline, resumable", description=HELP, formatter_class=formatter)
    p.add_argument("--config", help="YAML file with any of the config sections (see --print-config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting; repeatable")
    p.add_argument("--run-dir", help="run directory (config: run_dir)")
    p.add_argument("--model", help="starting model (config: model.model)")
    p.add_argument("--method", help="dlma, rlcd, context-distillation, rlaif or dlma-listwise (config: method)")
    p.add_argument("--rounds", type=int, help="iterations of generate -> score -> train (config: rounds)")
    p.add_argument("--compare", metavar="M1,M2,...", help="run several methods into RUN_DIR/<method>/ with one combined report")
    p.add_argument("--report-to", nargs="*", metavar="TRACKER",
                   help="tensorboard, wandb or none for every stage (config: generate/score/train/evaluate.report_to); "
                        "TensorBoard logs go to RUN_DIR/tensorboard")
    p.add_argument("--push-to-hub", metavar="REPO", help="after the run, upload the final model to REPO and its pairs to "
                                                         "REPO-pairs (as `dlma push`)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def shipped_defaults() -> RunConfig:
    text = resources.files("dlma.configs").joinpath(DEFAULT_CONFIG).read_text()
    return from_dict(RunConfig, yaml.safe_load(text) or {}, f"dlma/configs/{DEFAULT_CONFIG}")


def resolve_config(args) -> RunConfig:
    """Shipped defaults <- --config FILE <- named options <- --set overrides."""
    cfg = shipped_defaults()
    if args.config:
        cfg = load_yaml(RunConfig, args.config, base=cfg)
    named = [f"{key}={getattr(args, flag)}" for flag, key in
             (("run_dir", "run_dir"), ("model", "model.model"), ("method", "method"), ("rounds", "rounds"))
             if getattr(args, flag) is not None]
    if args.report_to is not None:
        named += [f"{section}.report_to={','.join(args.report_to) or 'none'}" for section in STAGES]
    return apply_overrides(cfg, named + args.overrides)


def run(args) -> int:
    from ..pipeline import Pipeline, compare, format_compare, format_stages, format_table

    cfg = resolve_config(args)
    if args.print_config:
        yaml.safe_dump(to_dict(cfg), sys.stdout, sort_keys=False)
        return 0
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
