"""The KL term's cost: training steps with `--kl-alpha` against the same steps without it.

`train.kl_alpha` (on in the default run) adds, for every `--kl-presets` pair, the untouched
model's greedy answer to its prompt as one more branch of the pair's packed context, and a KL
term along it. This measures what that costs a training step, side by side: two copies of the
same weights train on the same micro-batches in the same order through the trainer's own
`train_step` (float32, the default run's DLMA loss and NLL term on the
`no-overrefusal` pairs, reference log-probs from the initial weights, AdamW), one with the KL
term and one without, alternating step by step so a shared machine slows both alike. The
untouched answers are made once before the first step (as the trainer does, and caches); their
time is printed on its own. Fails (exit 1) if the first step's losses differ by more than 1e-4:
at the untouched weights the KL is 0, so the two must agree there.

Pairs: a scored pair file (`--data`, e.g. a run's `score/scored.jsonl`) or the bundled prompt
sets with written responses (see `train_layout.py`). The last line is the ratio of the KL
side's pairs/s over the baseline's (below 1: the term's cost).

    .venv/bin/python benchmarks/train_kl.py [--data runs/default/round-1/score/scored.jsonl] [--steps 12]
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from train_layout import model_and_examples, step_benchmark_args, verdict  # noqa: E402

from dlma.config import TrainConfig  # noqa: E402
from dlma.machine import cpu_kind  # noqa: E402
from dlma.train import attach_kl_answers, train_step, untouched_answers  # noqa: E402

RETAIN = "no-overrefusal"


def main() -> None:
    ap = step_benchmark_args(__doc__)
    ap.add_argument("--kl-tokens", type=int, default=32, help="length of the untouched answers (the default run's)")
    args = ap.parse_args()
    model, tok, base = model_and_examples(args)
    pad = tok.pad_token_id
    held = copy.deepcopy(base)
    wanted = [e for e in held if e.preset == RETAIN]
    t0 = time.perf_counter()
    saved = untouched_answers(model, tok, [e.context for e in wanted], args.kl_tokens, {})
    answers_s = time.perf_counter() - t0
    attach_kl_answers(wanted, saved)
    off = TrainConfig(lr=args.lr, rpo_alpha=0.2, rpo_presets=[RETAIN])  # the examples are cut to --response-tokens
    cfgs = {"baseline": off, "kl": dataclasses.replace(off, kl_alpha=1.0, kl_presets=[RETAIN])}
    data = {"baseline": base, "kl": held}
    models = {"baseline": model, "kl": copy.deepcopy(model)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, fused=True) for k, m in models.items()}
    secs, losses = {k: 0.0 for k in models}, {k: [] for k in models}
    accelerator = Accelerator(cpu=True)
    n_steps = min(args.steps, len(base) // args.batch_size)
    for n in range(n_steps):
        for k in (("baseline", "kl") if n % 2 == 0 else ("kl", "baseline")):
            batch = data[k][n * args.batch_size:(n + 1) * args.batch_size]
            res = train_step(models[k], opts[k], [batch], cfgs[k], pad, accelerator)
            losses[k].append(res.loss)
            if n:  # the first step warms up allocators and kernels on both sides
                secs[k] += res.seconds
    pairs = args.batch_size * (n_steps - 1)
    print(f"machine: {cpu_kind()}; float32")
    print(f"pairs: {len(base)} ({'file ' + args.data if args.data else 'bundled prompts, written responses'}), "
          f"{args.batch_size} per step, responses cut to {args.response_tokens} tokens; {n_steps - 1} timed steps")
    print(f"untouched answers: {sum(bool(e.kl_answer) for e in wanted)} of {RETAIN} prompts, "
          f"{sum(len(e.kl_answer or []) for e in wanted)} tokens, made once in {answers_s:.1f} s")
    for k in models:
        print(f"{k:9s} {pairs / secs[k]:6.2f} pairs/s  {secs[k]:.1f} s  last loss {losses[k][-1]:.4f}")
    verdict("first step's loss difference (KL at the untouched weights)", abs(losses["baseline"][0] - losses["kl"][0]),
            1e-4, "the KL term is not 0 at the untouched weights", secs["baseline"] / secs["kl"])


if __name__ == "__main__":
    main()
