"""The `dlma` command. Each subcommand lives in its own module here and only parses
arguments and calls the library; `COMMANDS` lists them in pipeline order."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import DlmaError, os_error_message

COMMANDS = ["generate", "score", "train", "evaluate", "run", "recipes", "prompts", "serve", "push"]

DESCRIPTION = """\
dlma aligns a language model to an attribute (harmless, helpful, or your own) without
human preference labels, following DLMA (Liu et al., ACL 2024):

  1. generate  sample a better answer under a positive prompt p+ and a worse one under p-
  2. score     judge each pair with the model's own probabilities (self-rewarding score R)
  3. train     DPO shifted by R, with the bare query as context (listwise: Plackett-Luce over
               best-of-K samples; baselines: dpo, ipo, sft)
  4. evaluate  compare the aligned model with the one it started from, write a report
  run          all of it in one resumable command
  recipes      the named configurations `dlma run --recipe NAME` starts from
  prompts      list the presets (p+/p- pairs); check one's contrast on a few prompts first
  serve        answer chat requests with a model on a local OpenAI-compatible API
  push         publish an aligned model and its pairs on the Hugging Face Hub

Every stage reads and writes files (JSONL, model directories, reports), so each can be
run alone. `dlma COMMAND --help` explains each one.
"""


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlma", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"dlma {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except DlmaError as exc:
        print(f"dlma {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, file-size limit, read-only or unwritable output
        print(f"dlma {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndlma {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
