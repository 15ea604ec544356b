"""Self-rewarding score: dlma's scorer against the authors' procedure, side by side.

Baseline (the authors' procedure, re-implemented): per batch of pairs, four separate
forward passes (p+ x o+, p- x o+, p+ x o-, p- x o-), each right-padded to the batch's
longest sequence, float32 weights, full logits, float32 log-softmax; nothing reused.
dlma: reward.score_pairs (each context once with both responses as branches, the prefix
shared by a family of contexts computed once and its KV reused, length bucketing, head
only on response positions), in exact mode (float32 model) and in mixed mode (bf16 body,
float32 head/log-softmax/sums, all four terms recomputed in that one precision). Both run
on the same pairs from `dlma generate` (bf16, 64 new tokens, seed 0, cached in a temp
dir). The last line is the ratio of dlma's default mode's pairs/s (exact, float32:
the mode that meets both accuracy targets; reference log-probs off like the baseline)
over the baseline's.

    .venv/bin/python benchmarks/score.py [--pairs 32] [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from dlma.config import GenerateConfig, ModelConfig, SamplingConfig  # noqa: E402
from dlma.data import read_pairs  # noqa: E402
from dlma.generate import TransformersBackend, generate_pairs  # noqa: E402
from dlma.models import load_model  # noqa: E402
from dlma.prompts import Renderer, as_messages, load_preset  # noqa: E402
from dlma.reward import MIXED_RECHECK_MARGIN, score_pairs  # noqa: E402


@torch.inference_mode()
def baseline_scores(model, tok, preset, pairs, batch_size: int) -> list[float]:
    """The authors' procedure: 4 padded float32 passes per batch, full logits, no reuse."""
    r = Renderer(tok, preset)
    pad = tok.pad_token_id

    def lps(ctxs, resps):
        seqs = [c + o for c, o in zip(ctxs, resps)]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), pad)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        labels = torch.full((len(seqs), T), -100)
        for i, (c, s) in enumerate(zip(ctxs, seqs)):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            labels[i, len(c):len(s)] = torch.tensor(s[len(c):])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = labels[:, 1:]
        lp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (lp * (labels != -100)).sum(-1).tolist()

    out = []
    for s in range(0, len(pairs), batch_size):
        group = pairs[s:s + batch_size]
        q = [as_messages(p["prompt"]) for p in group]
        pos = [r.context_ids(x, "positive") for x in q]
        neg = [r.context_ids(x, "negative") for x in q]
        c = [r.response_ids(p["chosen"], p.get("chosen_truncated", False)) for p in group]
        o = [r.response_ids(p["rejected"], p.get("rejected_truncated", False)) for p in group]
        cp, cn, rp, rn = lps(pos, c), lps(neg, c), lps(pos, o), lps(neg, o)
        out.extend((a - b) - (d - e) for a, b, d, e in zip(cp, cn, rp, rn))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32, help="pairs to score (generated once, cached)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "dlma-bench-score"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--exact-only", action="store_true",
                    help="skip the two bf16 modes (a CPU without fast bf16 runs them ~90x slower; the ratio line "
                         "is the exact mode's either way)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tok = load_model("embedded", "bfloat16", "cpu")
    path = Path(args.cache) / "pairs-bf16-64.jsonl"
    t0 = time.time()
    generate_pairs(ModelConfig(dtype="bfloat16"), GenerateConfig(limit=args.pairs, seed=0, batch_size=16),
                   str(path), sampling=SamplingConfig(max_new_tokens=64), backend=TransformersBackend(model, tok, 16), tokenizer=tok, progress=False)
    pairs = read_pairs(str(path), args.pairs)
    print(f"pairs: {len(pairs)} from dlma generate (bf16, 64 new tokens, seed 0) in {path} ({time.time() - t0:.0f} s)")
    preset = load_preset("harmless")

    f32, _ = load_model("embedded", "float32", "cpu")
    t = time.time()
    base = baseline_scores(f32, tok, preset, pairs, args.batch_size)
    t_base = time.time() - t
    t = time.time()
    exact = score_pairs(f32, tok, preset, pairs, batch_size=args.batch_size, reference=False)
    t_exact = time.time() - t
    n = len(pairs)
    diff = max(abs(a - b["self_reward"]) for a, b in zip(base, exact))
    print(f"baseline (authors': 4 padded float32 passes/batch): {n / t_base:.3f} pairs/s ({t_base:.1f} s)")
    print(f"dlma exact (float32, branches + shared prefix KV; generation was bf16, so no reuse): {n / t_exact:.3f} pairs/s "
          f"({t_exact:.1f} s), ratio {t_base / t_exact:.2f}")
    print(f"exact-mode agreement: max |R diff| = {diff:.2e} (target <= 1e-2)")
    if not args.exact_only:
        bf16_modes(model, f32, tok, preset, pairs, base, t_base, args.batch_size)
    print(f"ratio={t_base / t_exact:.2f}")


def bf16_modes(model, f32, tok, preset, pairs: list[dict], base: list[float], t_base: float, batch_size: int) -> None:
    """The bf16 model, and the float32 model under bf16 autocast with near-ties recomputed."""
    t = time.time()
    mixed = score_pairs(model, tok, preset, pairs, batch_size=batch_size, reference=False)
    t_mixed = time.time() - t
    t = time.time()
    st: dict = {}
    safe = score_pairs(f32, tok, preset, pairs, batch_size=batch_size, reference=False, precision="mixed", stats=st)
    t_safe = time.time() - t
    n = len(pairs)
    sign = sum((a > 0) == (b["self_reward"] > 0) for a, b in zip(base, mixed)) / n
    mdiff = max(abs(a - b["self_reward"]) for a, b in zip(base, mixed))
    small = sum(abs(a) < 0.5 for a in base)
    print(f"dlma mixed (bf16 body, float32 head; all four terms recomputed): {n / t_mixed:.3f} pairs/s "
          f"({t_mixed:.1f} s), ratio {t_base / t_mixed:.2f}")
    ssign = sum((a > 0) == (b["self_reward"] > 0) for a, b in zip(base, safe)) / n
    print(f"dlma mixed+recheck (float32 model, bf16 autocast body, |R| < {MIXED_RECHECK_MARGIN} recomputed exactly: "
          f"{st['mixed_rechecked']}/{n}): {n / t_safe:.3f} pairs/s ({t_safe:.1f} s), ratio {t_base / t_safe:.2f}; "
          f"sign agreement {ssign:.1%}")
    print(f"mixed-mode (bf16 model) sign agreement with float32 R: {sign:.1%} on {n} pairs (target >= 95%); max |R diff| = {mdiff:.2f}; "
          f"{small}/{n} pairs have |R| < 0.5")


if __name__ == "__main__":
    main()
