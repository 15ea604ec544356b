"""Contrastive generation: dlma's sampler against plain transformers `generate`, side by side.

Both sides sample the same contexts: those `dlma run` builds by default (`harmful-train`
under the `harmless` pair and `benign-train` under `no-overrefusal`, one pair per prompt,
p+ and p- contexts), chunk by chunk as `dlma generate` does, each row sampled from its own seed
(run seed, pair id, side) through dlma's RowSampler on both sides, in the same length-bucketed batches.

Baseline: `model.generate` on the left-padded batch (every context prefilled in full).
dlma: `TransformersBackend` (shared-prefix KV reuse: the system turn and demonstrations
of each preset side prefilled once; its own decoding loop over a key/value cache allocated
once per batch, where `generate` concatenates the cache at every step), which also records
the raw log-prob of every sampled token. Both sides decode the same number of rows at once
(`--batch-size`, dlma's default). The chunks of the two sides alternate, so a machine shared with other
jobs slows both alike.

A greedy pass first checks that both give the same tokens for every context and fails
(exit 1) if not; the timed pass samples (temperature/top-p of the default run) and
reports how many samples agree. The last line is the ratio of dlma's pairs/s over the
baseline's.

    .venv/bin/python benchmarks/generate.py [--limit 8] [--dtype auto] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from dlma.config import GenerateConfig  # noqa: E402
from dlma.data import ReadStats, read_prompts  # noqa: E402
from dlma.generate import RowSampler, SamplingParams, TransformersBackend, row_seed  # noqa: E402
from dlma.logprobs import length_buckets  # noqa: E402
from dlma.machine import cpu_kind  # noqa: E402
from dlma.models import load_model  # noqa: E402
from dlma.prompts import Renderer, load_preset  # noqa: E402


def chunks(tok, sources: list[str], presets: list[str], limit: int, num_pairs: int, batch_size: int, seed: int,
           max_context: int):
    """(row seeds, contexts) per chunk, exactly as dlma generate forms them."""
    prompts = []
    for source, preset in zip(sources, presets):
        r = Renderer(tok, load_preset(preset), max_context=max_context)
        prompts += [(p, r) for p in read_prompts(source, limit, ReadStats())]
    step = max(1, batch_size // 2)
    out = []
    for s in range(0, len(prompts), step):
        group = prompts[s:s + step]
        rows = [(p, r, p.id if num_pairs == 1 else f"{p.id}:{k}", side)
                for p, r in group for k in range(num_pairs) for side in ("positive", "negative")]
        out.append(([row_seed(seed, pid, side) for _, _, pid, side in rows], [r.context_ids(p.prompt, side) for p, r, _, side in rows]))
    return out


@torch.inference_mode()
def plain_generate(model, tok, contexts, params: SamplingParams, batch_size: int, seeds) -> list[list[int]]:
    """Plain `model.generate`, left-padded, in the same length-bucketed batches; tokens up to the stop token.

    Sampled rows draw from their own seeds through the same RowSampler dlma uses (transformers'
    plain temperature/top-p warpers inside it), so both sides sample the same way."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    class _Plain:  # transformers' own warpers, in their order
        def __call__(self, input_ids, scores):
            scores = TemperatureLogitsWarper(params.temperature)(input_ids, scores)
            return TopPLogitsWarper(params.top_p)(input_ids, scores) if params.top_p < 1 else scores

    pad, out = tok.pad_token_id, [None] * len(contexts)
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    for idx in length_buckets([len(c) for c in contexts], batch_size):
        T = max(len(contexts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, T - len(contexts[i]):] = torch.tensor(contexts[i])
            mask[j, T - len(contexts[i]):] = 1
        greedy = params.temperature <= 0
        proc = {} if greedy else {"logits_processor": LogitsProcessorList([RowSampler(_Plain(), [seeds[i] for i in idx])])}
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens, do_sample=False,
                              top_k=None, pad_token_id=pad, eos_token_id=sorted(stops), **proc)
        for j, i in enumerate(idx):
            toks = []
            for t in seqs[j, T:].tolist():
                if t in stops:
                    break
                toks.append(t)
            out[i] = toks
    return out


def run_both(model, tok, work, params: SamplingParams, batch_size: int, baseline: str = "plain",
             baseline_batch: int | None = None):
    """Alternate chunks between the baseline and dlma; (outputs, seconds) per side."""
    backend = TransformersBackend(model, tok, batch_size)
    base_bs = baseline_batch or batch_size
    # "generate-backend": dlma's backend decoding through model.generate (prefix reuse kept), to time the loop alone
    other = TransformersBackend(model, tok, base_bs, lean=False) if baseline == "generate-backend" else None
    res = {"plain": [], "dlma": []}
    secs = {"plain": 0.0, "dlma": 0.0}
    for seeds, ctx in work:
        for side in ("plain", "dlma"):
            t = time.perf_counter()
            if side == "plain" and other is not None:
                res[side] += [s.ids for s in other.sample(ctx, params, seeds=seeds)]
            elif side == "plain":
                res[side] += plain_generate(model, tok, ctx, params, base_bs, seeds)
            else:
                res[side] += [s.ids for s in backend.sample(ctx, params, seeds=seeds)]
            secs[side] += time.perf_counter() - t
    return res, secs, backend.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="harmful-train,benign-train")
    ap.add_argument("--preset", default="harmless,no-overrefusal")
    ap.add_argument("--limit", type=int, default=8, help="prompts per source")
    ap.add_argument("--num-pairs", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=GenerateConfig.batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", help="auto (what dlma picks: float32 on CPUs), float32, bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-greedy-check", action="store_true", help="skip the greedy equality pass")
    ap.add_argument("--baseline", choices=("plain", "generate-backend"), default="plain",
                    help="plain: model.generate, every context prefilled in full; generate-backend: dlma's backend "
                         "with its prefix reuse but decoding through model.generate (times dlma's decoding loop alone)")
    ap.add_argument("--baseline-batch-size", type=int, default=None, help="rows per batch on the baseline side (default: --batch-size)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"cpu: {cpu_kind()}")
    model, tok = load_model("embedded", args.dtype, "cpu")
    print(f"model: embedded SmolLM2-135M-Instruct, {str(model.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    sources = [s.strip() for s in args.prompts.split(",")]
    presets = [s.strip() for s in args.preset.split(",")]
    if len(presets) == 1:
        presets *= len(sources)
    work = chunks(tok, sources, presets, args.limit, args.num_pairs, args.batch_size, args.seed, 1024 - args.max_new_tokens)
    n_ctx = sum(len(c) for _, c in work)
    n_pairs = n_ctx // 2
    print(f"contexts: {n_ctx} ({n_pairs} pairs, mean {sum(len(x) for _, c in work for x in c) / n_ctx:.0f} tokens), "
          f"{args.max_new_tokens} new tokens, batch {args.batch_size}; baseline {args.baseline}, "
          f"batch {args.baseline_batch_size or args.batch_size}")
    both = dict(baseline=args.baseline, baseline_batch=args.baseline_batch_size)

    failed = False
    if not args.no_greedy_check:
        res, secs, _ = run_both(model, tok, work, SamplingParams(args.max_new_tokens, 0.0, 1.0, args.seed), args.batch_size, **both)
        diff = [i for i, (a, b) in enumerate(zip(res["plain"], res["dlma"])) if a != b]
        print(f"greedy: {n_ctx - len(diff)}/{n_ctx} outputs identical "
              f"(plain {n_pairs / secs['plain']:.3f} pairs/s, dlma {n_pairs / secs['dlma']:.3f} pairs/s)")
        if diff:
            failed = True
            print(f"GREEDY OUTPUTS DIFFER for {len(diff)} contexts, first at index {diff[0]}:\n"
                  f"  plain: {res['plain'][diff[0]]}\n  dlma:  {res['dlma'][diff[0]]}", file=sys.stderr)

    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    res, secs, stats = run_both(model, tok, work, params, args.batch_size, **both)
    same = sum(a == b for a, b in zip(res["plain"], res["dlma"]))
    new = sum(len(x) for x in res["dlma"])
    print(f"sampled (T={args.temperature}, top-p {args.top_p}, same seeds): {same}/{n_ctx} outputs identical, {new} new tokens")
    print(f"context tokens {stats['context_tokens']}; dlma prefilled {stats['prefilled_tokens']} of them "
          f"(shared prefixes: {stats['prefix_tokens']} token positions read from the cache)")
    print(f"baseline ({args.baseline}):{' ' * max(1, 17 - len(args.baseline))}{n_pairs / secs['plain']:.3f} pairs/s ({secs['plain']:.1f} s)")
    print(f"dlma TransformersBackend:    {n_pairs / secs['dlma']:.3f} pairs/s ({secs['dlma']:.1f} s)")
    if failed:
        print("FAILED: greedy outputs differ", file=sys.stderr)
        sys.exit(1)
    print(f"ratio={secs['plain'] / secs['dlma']:.2f}")


if __name__ == "__main__":
    main()
