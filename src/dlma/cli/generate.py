"""`dlma generate`: contrastive response pairs from a model."""

from __future__ import annotations

from ..config import GenerateConfig, ModelConfig, config_from_args
from .common import add_stage_options, formatter, print_summary, sampling_from, stage_base

HELP = """\
Sample, for every prompt, a response o+ under the positive prompt p+ and o- under the
negative prompt p- of a preset, and write one pair a line to --out (JSONL):
id, prompt, chosen (o+), rejected (o-), preset, generation settings, and the raw
log-probs of the sampled tokens (reused by `dlma score`).

A killed or interrupted run resumes when rerun with the same --out. With --recipe NAME (or
--config FILE) the settings are that run's generate stage, options given here on top.

examples:
  dlma generate --limit 8 --out pairs.jsonl
  dlma generate --recipe safety --out pairs.jsonl      # the pairs `dlma run` generates
  dlma generate --model HuggingFaceTB/SmolLM2-1.7B-Instruct --preset helpful --prompts my.jsonl --out pairs.jsonl
  dlma generate --preset my_pair.yaml --num-pairs 2 --temperature 0.8 --out pairs.jsonl
"""


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample contrastive pairs (o+ under p+, o- under p-)", description=HELP, formatter_class=formatter)
    add_stage_options(p, "output JSONL; an existing file is resumed", "also write the run summary to this JSON file",
                      ModelConfig, GenerateConfig, stage="generate")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..generate import generate_pairs
    from ..stages import generate_config

    base = stage_base(args)
    summary = generate_pairs(config_from_args(ModelConfig, args, base and base.model),
                             config_from_args(GenerateConfig, args, base and generate_config(base)), args.out,
                             sampling=sampling_from(args, base), progress=not args.no_progress)
    print_summary(summary, args.summary)
    return 0
