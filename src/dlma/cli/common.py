"""Small helpers the subcommands share."""

from __future__ import annotations

import argparse
import json
import sys


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def print_summary(summary: dict, path: str | None = None) -> None:
    """Print a summary as JSON on stderr (stdout stays clean for pipes); optionally save it."""
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    print(text, file=sys.stderr)
    if path:
        from ..data import write_json

        write_json(path, summary)


def add_stage_options(p: argparse.ArgumentParser, out_help: str, summary_help: str, *configs: type) -> None:
    """The options every stage command shares: --out, --summary, --no-progress, then one
    flag per field of each config dataclass."""
    from ..config import add_config_args

    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--summary", help=summary_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for cls in configs:
        add_config_args(p, cls)
