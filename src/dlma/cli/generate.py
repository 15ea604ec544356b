"""`dlma generate`: contrastive response pairs from a model."""

from __future__ import annotations

from ..config import GenerateConfig, ModelConfig, config_from_args
from .common import add_stage_options, formatter, print_summary

HELP = """\
Sample, for every prompt, a response o+ under the positive prompt p+ and o- under the
negative prompt p- of a preset, and write one pair a line to --out (JSONL):
id, prompt, chosen (o+), rejected (o-), preset, generation settings, and the raw
log-probs of the sampled tokens (reused by `dlma score`).

A killed or interrupted run resumes when rerun with the same --out.

examples:
  dlma generate --limit 8 --out pairs.jsonl
  dlma generate --model HuggingFaceTB/SmolLM2-1.7B-Instruct --preset helpful --prompts my.jsonl --out pairs.jsonl
  dlma generate --preset my_pair.yaml --num-pairs 2 --temperature 0.8 --out pairs.jsonl
"""


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample contrastive pairs (o+ under p+, o- under p-)", description=HELP, formatter_class=formatter)
    add_stage_options(p, "output JSONL; an existing file is resumed", "also write the run summary to this JSON file",
                      ModelConfig, GenerateConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..generate import generate_pairs

    summary = generate_pairs(config_from_args(ModelConfig, args), config_from_args(GenerateConfig, args), args.out,
                             progress=not args.no_progress)
    print_summary(summary, args.summary)
    return 0
