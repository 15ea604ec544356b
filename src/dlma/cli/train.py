"""`dlma train`: self-rewarding DPO (and its baselines) on scored pairs."""

from __future__ import annotations

from ..config import ModelConfig, TrainConfig, config_from_args
from ..objectives import objectives
from .common import add_stage_options, formatter, print_summary, sampling_from, stage_base

HELP = """\
Train a model on scored pairs (from `dlma score`) with the bare query as context and save
it to --out, a directory AutoModelForCausalLM / AutoTokenizer load.

{losses}

Reference log-probs come from the scored file, else they are computed once from the
initial weights before the first step: no reference model is held during training.
--kl-alpha A holds the answers to some prompts where they were: the untouched model answers
each --kl-presets pair's prompt greedily (--kl-tokens long) before the first step, and the
loss adds A x the mean per-token KL(untouched || model) along that answer (the untouched
model's top-20 next tokens and a bucket for the rest, kept in --out/kl_reference.pt).
--rpo-roles / --kl-roles attach those terms to the presets that declare a role (`role: retain`
in a preset: its p+ keeps the model's own answers); a role no preset of the pairs has leaves the
term off. With --recipe NAME (or --config FILE) the settings are that run's training (its
method's loss, terms and interpolation), options given here on top: `dlma train --recipe safety`
trains as `dlma run` does; without either, the defaults below (the paper's loss alone).
--out also gets metrics.jsonl (loss, reward margin/accuracy, lr, tokens/s), checkpoints
every --save-steps, and train_summary.json. Rerun the same command to resume after a kill.

Speed and memory: chosen and rejected share one copy of the context, the prefix all contexts
of a micro-batch share (the chat template's system turn) is computed once, and pairs are
packed into rows without padding (--no-share-context: one padded row per pair); with
--max-grad-norm 0 on one process each weight is updated inside the backward pass and its
gradient freed (--step-in-backward); --gradient-checkpointing trades ~25% speed for most of
the activations.

Many GPUs: the same command under accelerate, e.g.
  accelerate launch --config_file src/dlma/configs/accelerate/fsdp_8gpu.yaml -m dlma.cli train ...

examples:
  dlma train --data scored.jsonl --out ckpt
  dlma train --recipe safety --data scored.jsonl --out ckpt   # as `dlma run` trains
  dlma train --data scored.jsonl --out ckpt --loss dpo --lr 5e-7 --batch-size 8 --grad-accum 8
  dlma train --data scored.jsonl --out ckpt --lora-r 16 --no-save-merged
  dlma train --data scored.jsonl --out ckpt --response-tokens 8 --kl-alpha 1 --kl-presets no-overrefusal
"""


def register(sub) -> None:
    losses = objectives()
    listing = "\n".join(f"  --loss {name:<9}{o.summary}" for name, o in losses.items())
    p = sub.add_parser("train", help=f"train on scored pairs ({', '.join(losses)})", description=HELP.format(losses=listing),
                       formatter_class=formatter)
    p.add_argument("--data", required=True, help="scored pair file (JSONL from `dlma score`, or any pair file for dpo/ipo/sft)")
    add_stage_options(p, "output directory (final model, checkpoints, metrics.jsonl); resumed if it exists",
                      "also write the run summary to this JSON file", ModelConfig, TrainConfig,
                      stage="train")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..stages import train_config
    from ..train import train_model

    base = stage_base(args)
    summary = train_model(config_from_args(ModelConfig, args, base and base.model),
                          config_from_args(TrainConfig, args, base and train_config(base)), args.data, args.out,
                          sampling=sampling_from(args, base), progress=not args.no_progress)
    summary = {k: v for k, v in summary.items() if k != "resume_key"}
    print_summary(summary, args.summary)
    return 0
