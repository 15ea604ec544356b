"""Small helpers the subcommands share."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import RunConfig, SamplingConfig


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def print_summary(summary: dict, path: str | None = None) -> None:
    """Print a summary as JSON on stderr (stdout stays clean for pipes); optionally save it."""
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    print(text, file=sys.stderr)
    if path:
        from ..data import write_json

        write_json(path, summary)


def add_stage_options(p: argparse.ArgumentParser, out_help: str, summary_help: str, *configs: type, stage: str) -> None:
    """The options every stage command shares: --out, --summary, --no-progress, --recipe, --config,
    then one flag per field of each config dataclass, and the sampling settings `stage` reads."""
    from ..config import SAMPLING_OF, SamplingConfig, add_config_args

    add_recipe_options(p)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--summary", help=summary_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for cls in configs:
        add_config_args(p, cls)
    add_config_args(p, SamplingConfig, only=SAMPLING_OF[stage], title="sampling options (the `sampling` section of a run)")


def sampling_from(args: argparse.Namespace, base: RunConfig | None) -> SamplingConfig:
    """The sampling settings of a stage command: its --recipe/--config's section, options given here on top."""
    from ..config import SamplingConfig, config_from_args

    return config_from_args(SamplingConfig, args, base and base.sampling)


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    """--recipe and --config: start from a whole run configuration, as `dlma run` does."""
    p.add_argument("--recipe", help="start from a named recipe (`dlma recipes` lists them; default of `dlma run`: safety)")
    p.add_argument("--config", help="YAML run configuration (as `dlma run --config`; laid over --recipe where both are given)")


def stage_base(args: argparse.Namespace) -> RunConfig | None:
    """The run configuration a stage command starts from: its --recipe with its --config laid over it;
    None where neither is given (the stage's own defaults). Options given on the command line win."""
    if not (args.recipe or args.config):
        return None
    from ..recipes import base_config

    return base_config(args.recipe, args.config)
