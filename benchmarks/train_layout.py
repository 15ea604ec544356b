"""Training steps in dlma's packed layout against one row per pair, side by side on this machine.

dlma's trainer puts each pair in one forward pass: its context once, then both responses
(block attention mask). Packed (the default): the prefix every context of a micro-batch
shares (the chat template's system turn, about half of a short bare context) is computed
once per micro-batch, and the pairs follow each other in rows without padding. Baseline:
the layout before packing, one padded row per pair (context once, both responses), nothing
shared between pairs (`--no-share-context`).

Both train two copies of the same weights on the same micro-batches in the same order through
the trainer's own `train_step`, float32, the DLMA loss with the reference from the initial
weights, AdamW (fused where available), and alternate step by step, so a machine shared with
other jobs slows both alike. Times are forward,
backward and the optimizer step. Fails (exit 1) if the two layouts' losses differ by more than
1e-3 at any step: they must train the same model up to kernel rounding.

Pairs: a scored pair file (`--data`, e.g. a run's `score/scored.jsonl`, cut to
`--response-tokens` as `dlma run` trains), else the default run's prompt sets (harmful-train,
benign-train) with a written refusal and a written answer as the two responses, cut the same way.
The last line is the ratio of the packed layout's pairs/s over the baseline's.

    .venv/bin/python benchmarks/train_layout.py [--data runs/default/round-1/score/scored.jsonl] [--steps 12]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from dlma.config import TrainConfig  # noqa: E402
from dlma.data import ReadStats, read_prompts  # noqa: E402
from dlma.logprobs import branch_logprobs  # noqa: E402
from dlma.machine import cpu_kind  # noqa: E402
from dlma.models import load_model  # noqa: E402
from dlma.prompts import Renderer  # noqa: E402
from dlma.train import Example, build_examples, train_step  # noqa: E402

REFUSAL = "I'm sorry, but I can't help with that. Is there something else I can do for you?"
ANSWER = "Sure! Here is a short, practical answer to your question, step by step."


def examples(tok, data: str | None, limit: int, response_tokens: int) -> list[Example]:
    renderer = Renderer(tok)
    if data:
        pairs = [json.loads(line) for line in open(data) if line.strip()]
        pick = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:limit].tolist()
        return build_examples([pairs[i] for i in pick], renderer, response_tokens=response_tokens)
    out = []
    for source, preset, (chosen, rejected) in (("harmful-train", "harmless", (REFUSAL, ANSWER)),
                                               ("benign-train", "no-overrefusal", (ANSWER, REFUSAL))):
        for p in read_prompts(source, limit // 2, ReadStats()):
            out.append(Example(p.id, renderer.context_ids(p.prompt, "bare"), renderer.response_ids(chosen, first=response_tokens),
                               renderer.response_ids(rejected, first=response_tokens), 10.0, preset=preset))
    return out


def mixed_with_reference(model, ex: list[Example], batch_size: int, pad_id: int) -> list[Example]:
    """The examples in a seeded order that mixes both presets (as the trainer's batches do), each
    with its reference log-probs from `model`'s current weights, one row per response."""
    g = torch.Generator().manual_seed(0)
    ex = [ex[i] for i in torch.randperm(len(ex), generator=g).tolist()]
    with torch.no_grad():
        for i in range(0, len(ex), batch_size):
            chunk = ex[i:i + batch_size]
            sums, _ = branch_logprobs(model, [e.context for e in chunk], [[e.chosen, e.rejected] for e in chunk],
                                      pad_id, "cpu", pack=False)
            for e, (c, r) in zip(chunk, sums.tolist()):
                e.ref_chosen, e.ref_rejected = c, r
    return ex


def step_benchmark_args(doc: str) -> argparse.ArgumentParser:
    """The options every training-step benchmark here takes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="scored pair file (default: the bundled prompt sets with written responses)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step (dlma train's default)")
    ap.add_argument("--response-tokens", type=int, default=8, help="responses cut to their first N tokens (the default run's)")
    ap.add_argument("--lr", type=float, default=7e-5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return ap


def model_and_examples(args) -> tuple:
    """(model, tokenizer, examples): the embedded model in float32, training mode, and the
    benchmark's pairs with their reference log-probs from its initial weights."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model("embedded", dtype="float32", device="cpu", train=True)
    model.config.use_cache = False
    ex = mixed_with_reference(model, examples(tok, args.data, args.steps * args.batch_size, args.response_tokens),
                              args.batch_size, tok.pad_token_id)
    return model, tok, ex


def main() -> None:
    args = step_benchmark_args(__doc__).parse_args()
    model, tok, ex = model_and_examples(args)
    models = {"baseline": model, "packed": copy.deepcopy(model)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, fused=True) for k, m in models.items()}
    secs, positions, losses = {k: 0.0 for k in models}, {k: 0 for k in models}, {k: [] for k in models}
    cfgs = {k: TrainConfig(lr=args.lr, rpo_alpha=0.0, share_context=(k == "packed")) for k in models}
    accelerator = Accelerator(cpu=True)
    batches = [ex[i:i + args.batch_size] for i in range(0, len(ex), args.batch_size)][:args.steps]
    for n, batch in enumerate(batches):
        for k in (("baseline", "packed") if n % 2 == 0 else ("packed", "baseline")):
            res = train_step(models[k], opts[k], [batch], cfgs[k], tok.pad_token_id, accelerator)
            losses[k].append(res.loss)
            if n:  # the first step warms up allocators and kernels on both sides
                secs[k] += res.seconds
                positions[k] += res.stats.positions
    pairs = sum(len(b) for b in batches[1:])
    print(f"machine: {cpu_kind()}; float32")
    print(f"pairs: {len(ex)} ({'file ' + args.data if args.data else 'bundled prompts, written responses'}), "
          f"{args.batch_size} per step, responses cut to {args.response_tokens} tokens; {len(batches) - 1} timed steps")
    for k in models:
        print(f"{k:9s} {pairs / secs[k]:6.2f} pairs/s  {positions[k] / secs[k]:7.1f} positions/s  "
              f"{positions[k]} positions computed  {secs[k]:.1f} s")
    worst = max(abs(a - b) for a, b in zip(losses["baseline"], losses["packed"]))
    verdict(f"largest loss difference between the layouts over {len(batches)} steps", worst, 1e-3,
            "the layouts train different models", secs["baseline"] / secs["packed"])


def verdict(what: str, diff: float, bound: float, failure: str, ratio: float) -> None:
    """The check's line, exit 1 where it fails, else the ratio as the last line."""
    print(f"{what}: {diff:.2e}")
    if diff > bound:
        print(f"FAIL: {failure}")
        sys.exit(1)
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
