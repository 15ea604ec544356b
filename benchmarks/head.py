"""The output layer on a `logits_to_keep` slice: dlma's contiguous-input hook against none.

Loads the embedded model, runs the same prefill (batch x tokens, logits of the last position
only, as generation does) with the hook dlma registers and with it removed, alternating,
and checks the logits agree. The last line is the ratio of the time without the hook over
the time with it.

    .venv/bin/python benchmarks/head.py [--dtype bfloat16] [--batch 16] [--tokens 150] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402


from dlma.machine import cpu_kind  # noqa: E402
from dlma.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", help="the weights' dtype (the copy happens with bf16 on CPUs)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"cpu: {cpu_kind()}")
    model, _ = load_model("embedded", args.dtype, "cpu")
    head = model.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    ids = torch.randint(0, 40000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    secs = {"hook": 0.0, "none": 0.0}
    logits = {}
    with torch.inference_mode():
        for side in ("hook", "none"):  # warm-up, both paths
            head._forward_pre_hooks.clear()
            if side == "hook":
                head._forward_pre_hooks.update(hooks)
            logits[side] = model(ids, logits_to_keep=1).logits.float()
        for _ in range(args.repeats):
            for side in ("hook", "none"):
                head._forward_pre_hooks.clear()
                if side == "hook":
                    head._forward_pre_hooks.update(hooks)
                t = time.perf_counter()
                model(ids, logits_to_keep=1)
                secs[side] += time.perf_counter() - t
    head._forward_pre_hooks.update(hooks)
    diff = float((logits["hook"] - logits["none"]).abs().max())
    print(f"model: embedded, {args.dtype}, {torch.get_num_threads()} threads; prefill {args.batch} x {args.tokens} tokens, "
          f"logits of the last position")
    print(f"with the contiguous-input hook: {secs['hook'] / args.repeats:.3f} s per prefill")
    print(f"without it (transformers as is): {secs['none'] / args.repeats:.3f} s per prefill")
    print(f"max |logit difference|: {diff:.2e}")
    print(f"ratio={secs['none'] / secs['hook']:.2f}")


if __name__ == "__main__":
    main()
