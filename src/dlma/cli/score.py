"""`dlma score`: the self-rewarding score R (and the RLAIF text judge) for a pair file."""

from __future__ import annotations

from ..config import ModelConfig, ScoreConfig, config_from_args
from .common import add_stage_options, formatter, print_summary, sampling_from, stage_base

HELP = """\
Judge every pair of --data with the model's own probabilities under the contrastive
prompts, R = [lp(o+|p+) - lp(o+|p-)] - [lp(o-|p+) - lp(o-|p-)], and write the records
to --out with self_reward, its four terms (lp_chosen_pos, lp_chosen_neg, lp_rejected_pos,
lp_rejected_neg), token counts and, with --reference (default), ref_lp_chosen and
ref_lp_rejected under the bare context, so training needs no second model.

--data takes `dlma generate` output, any JSONL with prompt/chosen/rejected, or HH-RLHF
dialogues (bundled: hh-harmless); with human labels the summary reports `accuracy`.
--judge text asks the model "A or B?" in both orders instead (the RLAIF baseline).
A killed or interrupted run resumes when rerun with the same --out. With --recipe NAME (or
--config FILE) the settings are that run's score stage (its judge, and the reference of the
response openings its training reads), options given here on top.

examples:
  dlma score --data pairs.jsonl --out scored.jsonl
  dlma score --recipe safety --data pairs.jsonl --out scored.jsonl   # as `dlma run` scores
  dlma score --data hh-harmless --dtype float32 --summary s.json --out hh-scored.jsonl
  dlma score --data hh-harmless --judge text --summary judge.json --out hh-judged.jsonl
"""


def register(sub) -> None:
    p = sub.add_parser("score", help="self-rewarding score R of each pair (or the RLAIF text judge)", description=HELP,
                       formatter_class=formatter)
    p.add_argument("--data", required=True, help="pair file (JSONL/JSON/CSV, HH-RLHF dialogues) or bundled hh-harmless[:train|:test]")
    add_stage_options(p, "output JSONL; an existing file is resumed",
                      "also write the summary (R statistics, accuracy, judge stats) to this JSON file", ModelConfig, ScoreConfig,
                      stage="score")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..reward import score_file
    from ..stages import score_config

    base = stage_base(args)
    summary = score_file(config_from_args(ModelConfig, args, base and base.model),
                         config_from_args(ScoreConfig, args, base and (score_config(base) or base.score)), args.data, args.out,
                         sampling=sampling_from(args, base), progress=not args.no_progress, summary_path=args.summary)
    print_summary(summary)
    return 0
