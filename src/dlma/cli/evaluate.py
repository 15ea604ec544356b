"""`dlma evaluate`: compare an aligned model with its baseline and write a report."""

from __future__ import annotations

from ..config import EvalConfig, ModelConfig, config_from_args
from ..errors import DlmaError
from .common import add_stage_options, formatter, print_summary, sampling_from, stage_base

HELP = """\
Answer held-out prompts with the aligned model (--model) and a baseline (--baseline), under
the bare context, then measure:

  judges     win / tie / lose of aligned vs baseline, position-swapped (--judge, several allowed):
             self-reward       the base model's contrastive probability judge (the training signal)
             llm:MODEL         a Hugging Face causal LM asked which answer is better
             reward:MODEL      a sequence-classification reward model (cost:MODEL: lower is better)
             openai:MODEL      an OpenAI-compatible endpoint (OPENAI_BASE_URL, OPENAI_API_KEY), cached
  attribute  how often the answers show the preset's attribute, by its detector (`detector:` in
             the preset: phrases, a length rule, a regex, your function), with 95% intervals
  refusals   refusal rate on prompts labelled unsafe, over-refusal on prompts labelled safe
  quality    perplexity under a reference model, length, distinct-1/2, empty and truncated answers
  --pairs    accuracy of the self-reward and of the text judge on human-labelled pairs

The baseline is the model --model was aligned from (read from its train_summary.json, through
every round), else the --recipe/--config's model; --baseline names another. With --recipe NAME
(or --config FILE) the settings are that run's evaluation (its prompts, and its first preset
for the attribute), options given here on top.

--out DIR gets metrics.json, report.md, index.html (self-contained, opens offline) and the
cached answers and verdicts: a rerun with the same --out regenerates nothing.

examples:
  dlma evaluate --model runs/default/final-model --out report/
  dlma evaluate --recipe safety --model runs/default/final-model --out report/   # as `dlma run` evaluates
  dlma evaluate --model runs/dlma/model --prompts my.jsonl --limit 50 --judge self-reward openai:gpt-4o-mini --out report/
  dlma evaluate --model embedded --baseline embedded --answer-temperature 0.7 --limit 12 --out selfcheck/
"""


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="compare the aligned model with its baseline; write a report",
                       description=HELP, formatter_class=formatter)
    p.add_argument("--baseline", help="model to compare against (default: the model --model was aligned from)")
    add_stage_options(p, "report directory; its cached answers are reused", "also write the metrics to this JSON file",
                      ModelConfig, EvalConfig, stage="evaluate")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluate import evaluate_models
    from ..stages import evaluate_config
    from ..train.checkpoints import starting_model

    base = stage_base(args)
    model_cfg = config_from_args(ModelConfig, args, base and base.model)
    eval_cfg = config_from_args(EvalConfig, args, base and evaluate_config(base))
    sampling = sampling_from(args, base)
    baseline = args.baseline or starting_model(model_cfg.model) or (base and base.model.model)
    if not baseline or baseline == model_cfg.model and not args.baseline:
        raise DlmaError(f"cannot tell which model {model_cfg.model} was aligned from (it holds no train_summary.json); "
                        "name the baseline with --baseline MODEL")
    metrics = evaluate_models(model_cfg, eval_cfg, args.out, model=model_cfg.model, baseline=baseline,
                              sampling=sampling, progress=not args.no_progress)
    summary = {"out": args.out, "judges": {k: {f: v.get(f) for f in ("win", "tie", "lose", "failed", "adjusted_win_rate")}
                                           for k, v in metrics["judges"].items()},
               "baseline": baseline,
               **({"attribute": {r: metrics["attribute"][r]["rate"] for r in ("aligned", "baseline")}} if "attribute" in metrics else {}),
               "refusal": {r: {k: metrics["refusal"][r][k] for k in ("refusal_rate", "over_refusal_rate")} for r in ("aligned", "baseline")},
               "perplexity": {r: metrics["quality"][r]["perplexity"] for r in ("aligned", "baseline")},
               "seconds": metrics["seconds"]}
    print_summary(summary, args.summary)
    return 0
