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
