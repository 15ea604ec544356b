"""Training steps with dlma's `--torch-compile` against the same steps in eager mode, side by side.

`--torch-compile` compiles each decoder layer in place (`dlma.train.compile_layers`: torch's
regional compilation, dynamic shapes). Both sides train a copy of the same weights on the same
micro-batches in the same order, packed layout, float32, the DLMA loss with the reference from
the initial weights, AdamW (fused where available), alternating step by step so a machine shared
with other jobs slows both alike. The first step of each side is left out of the timing (the
compiled side compiles there; its extra seconds are printed as the compile cost). Fails (exit 1)
if the losses differ by more than 1e-3 at any step: compiling must not change what is trained.
The last line is the ratio of the compiled side's pairs/s over eager's, steps 2..n.

    .venv/bin/python benchmarks/compile.py [--data runs/default/round-1/score/scored.jsonl] [--steps 12]

On a GPU the same comparison runs inside `benchmarks/gpu.py --torch-compile` (against TRL).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from train_layout import model_and_examples, step_benchmark_args, verdict  # noqa: E402

from dlma.config import TrainConfig  # noqa: E402

from dlma.machine import cpu_kind  # noqa: E402
from dlma.train import compile_layers, train_step  # noqa: E402


def main() -> None:
    args = step_benchmark_args(__doc__).parse_args()
    model, tok, ex = model_and_examples(args)
    models = {"eager": model, "compiled": copy.deepcopy(model)}
    layers = compile_layers(models["compiled"])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, fused=True) for k, m in models.items()}
    secs, first, losses = {k: 0.0 for k in models}, {}, {k: [] for k in models}
    cfg = TrainConfig(lr=args.lr, rpo_alpha=0.0, share_context=True)
    accelerator = Accelerator(cpu=True)
    batches = [ex[i:i + args.batch_size] for i in range(0, len(ex), args.batch_size)][:args.steps]
    for n, batch in enumerate(batches):
        for k in (("eager", "compiled") if n % 2 == 0 else ("compiled", "eager")):
            res = train_step(models[k], opts[k], [batch], cfg, tok.pad_token_id, accelerator)
            losses[k].append(res.loss)
            if n:
                secs[k] += res.seconds
            else:
                first[k] = res.seconds
    pairs = sum(len(b) for b in batches[1:])
    print(f"machine: {cpu_kind()}; float32; torch {torch.__version__}")
    print(f"pairs: {len(ex)} ({'file ' + args.data if args.data else 'bundled prompts, written responses'}), "
          f"{args.batch_size} per step, responses cut to {args.response_tokens} tokens; {len(batches) - 1} timed steps; "
          f"{layers} decoder layers compiled")
    print(f"compile cost: first step {first['compiled']:.1f} s compiled against {first['eager']:.1f} s eager")
    for k in models:
        print(f"{k:9s} {pairs / secs[k]:6.2f} pairs/s  {secs[k]:.1f} s")
    worst = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))
    verdict(f"largest loss difference, compiled against eager, over {len(batches)} steps", worst, 1e-3,
            "compiling changes what is trained", secs["eager"] / secs["compiled"])


if __name__ == "__main__":
    main()
