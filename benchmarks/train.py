"""dlma train (--loss dpo) against TRL's DPOTrainer, side by side on this machine.

Both train the embedded model on the same pairs (bare chat context, responses ending with
the end-of-turn token) for the same number of steps with the same batch size, in the same
precision (bf16 autocast over float32 weights where the CPU supports bf16, for both), each
in its own subprocess so its peak RSS is its own. dlma computes its reference log-probs
from the scored file (as `dlma score` writes them; computed untimed by a helper process)
and, in a second run, inside the timed run (the pairs carry none); TRL keeps its default reference model, as a
user configures it. Tokens are the non-padding tokens of chosen and rejected rows; both
process every pair once, so they count the same tokens.

Then, in float32 from the same weights, both losses on the same first batch, with the
policy one dlma step away from the reference so the check is not trivially log 2.

Every worker imports the same modules (torch, transformers, datasets, trl, dlma) and runs
the same number of torch threads, so import RSS and cores are equal. Both use the same
gradient clipping (--max-grad-norm; 0 by default, which lets dlma update each weight
inside the backward pass, exact only without clipping); dlma uses gradient checkpointing
unless --checkpointing says otherwise (TRL is set to off explicitly, its own default differs by version; `both` turns it on for TRL
too). Times are the training steps only (model loading and tokenisation excluded for
both); --repeats alternates the runs and keeps each trainer's fastest, since this machine
is shared.

Prints speed_ratio (dlma tokens/s over TRL's) and memory_ratio (dlma peak RSS over TRL's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def common_setup(a) -> None:
    """Every worker imports the same modules and uses the same threads, so import RSS and cores are equal."""
    import datasets  # noqa: F401
    import torch
    import trl  # noqa: F401
    from trl import DPOTrainer  # noqa: F401

    import dlma.train  # noqa: F401

    torch.set_num_threads(a.threads)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_pairs(path: Path, n: int, words: int) -> None:
    from dlma.data import read_pairs

    with open(path, "w") as f:
        for p in read_pairs("hh-harmless:train", limit=n):
            user = [m for m in p["prompt"] if m["role"] == "user"][-1]["content"]
            cut = lambda t: " ".join(t.split()[:words])  # noqa: E731
            f.write(json.dumps({"id": p["id"], "prompt": [{"role": "user", "content": cut(user)}],
                                "chosen": cut(p["chosen"]), "rejected": cut(p["rejected"])}) + "\n")


def trl_dataset(pairs_path: Path):
    """The same pairs for TRL: prompt = dlma's bare context text, completions end with EOS."""
    from datasets import Dataset

    from dlma.data import read_pairs
    from dlma.models import load_tokenizer
    from dlma.prompts import Renderer

    tok = load_tokenizer("embedded")
    r = Renderer(tok)
    rows = [{"prompt": r.context_text(p["prompt"], "bare"), "chosen": p["chosen"] + tok.eos_token,
             "rejected": p["rejected"] + tok.eos_token} for p in read_pairs(str(pairs_path))]
    return Dataset.from_list(rows), tok


def count_tokens(pairs_path: Path) -> int:
    from dlma.data import read_pairs
    from dlma.models import load_tokenizer
    from dlma.prompts import Renderer
    from dlma.train import build_examples

    ex = build_examples(read_pairs(str(pairs_path)), Renderer(load_tokenizer("embedded")))
    return sum(2 * len(e.context) + len(e.chosen) + len(e.rejected) for e in ex)


def worker_dlma(a) -> dict:
    from dlma.config import ModelConfig, TrainConfig
    from dlma.train import train_model

    out = tempfile.mkdtemp(prefix="bench-dlma-")
    s = train_model(ModelConfig(dtype="float32" if a.precision == "no" else "auto"),
                    TrainConfig(loss="dpo", rpo_alpha=0.0, batch_size=a.batch_size, max_steps=a.steps, lr=1e-6, mixed_precision=a.precision,
                                max_grad_norm=a.max_grad_norm, gradient_checkpointing=a.checkpointing in ("dlma", "both"),
                                save_steps=0, seed=0), str(a.data), out, progress=False)
    return {"seconds": s["reference_seconds"] + s["train_seconds"], "reference": s["reference"], "out": out,
            "step_in_backward": s["step_in_backward"], "share_context": s["share_context"]}


def _trl_args(a, out, precision):
    from trl import DPOConfig

    return DPOConfig(output_dir=out, per_device_train_batch_size=a.batch_size, max_steps=a.steps, learning_rate=1e-6,
                     bf16=precision == "bf16", loss_type=["sigmoid"], beta=0.1, logging_steps=1, save_strategy="no",
                     max_grad_norm=a.max_grad_norm, gradient_checkpointing=a.checkpointing == "both",
                     report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, max_length=None,
                     disable_tqdm=True)


def worker_refs(a) -> dict:
    """Add ref_lp_chosen/ref_lp_rejected to the pairs, as `dlma score` does (not timed)."""
    import torch

    from dlma.data import read_pairs
    from dlma.logprobs import score_sequences
    from dlma.models import load_model
    from dlma.prompts import Renderer
    from dlma.train import build_examples

    model, tok = load_model("embedded", dtype="float32", device="cpu")
    pairs = read_pairs(str(a.data))
    ex = build_examples(pairs, Renderer(tok))
    ctx = [e.context for e in ex]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
        sums, _ = score_sequences(model, ctx + ctx, [e.chosen for e in ex] + [e.rejected for e in ex], pad_id=tok.pad_token_id)
    out = Path(str(a.data).replace(".jsonl", "-ref.jsonl"))
    with open(out, "w") as f:
        for i, p in enumerate(pairs):
            f.write(json.dumps(dict(p, ref_lp_chosen=sums[i], ref_lp_rejected=sums[len(ex) + i])) + "\n")
    return {"path": str(out)}


def worker_trl(a) -> dict:
    from trl import DPOTrainer

    from dlma.models import embedded_model_dir

    ds, tok = trl_dataset(a.data)
    out = tempfile.mkdtemp(prefix="bench-trl-")
    from transformers import TrainerCallback

    class Clock(TrainerCallback):  # the training steps only, as dlma's train_seconds
        seconds, t0 = 0.0, 0.0

        def on_step_begin(self, *args, **kw):
            Clock.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            Clock.seconds += time.perf_counter() - Clock.t0

    trainer = DPOTrainer(model=str(embedded_model_dir()), args=_trl_args(a, out, a.precision), train_dataset=ds,
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"seconds": Clock.seconds}


def worker_check(a) -> dict:
    """float32 first-batch DPO loss of both trainers: policy = a.policy, reference = the embedded weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from dlma.config import TrainConfig
    from dlma.data import read_pairs
    from dlma.logprobs import score_sequences
    from dlma.models import embedded_model_dir, load_tokenizer
    from dlma.prompts import Renderer
    from dlma.train import build_examples, micro_batch_losses

    tok = load_tokenizer("embedded")
    pairs = read_pairs(str(a.data), limit=a.batch_size)
    ex = build_examples(pairs, Renderer(tok))
    ref = AutoModelForCausalLM.from_pretrained(str(embedded_model_dir()), dtype=torch.float32).eval()
    ctx = [e.context for e in ex]
    sums, _ = score_sequences(ref, ctx + ctx, [e.chosen for e in ex] + [e.rejected for e in ex], pad_id=tok.pad_token_id)
    for i, e in enumerate(ex):
        e.ref_chosen, e.ref_rejected = sums[i], sums[len(ex) + i]
    policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32).eval()
    with torch.no_grad():
        res, _, _ = micro_batch_losses(policy, ex, TrainConfig(loss="dpo", beta=0.1, rpo_alpha=0.0), tok.pad_token_id, "cpu")
    dlma_loss = float(res.losses.mean())

    ds, _ = trl_dataset(a.data)
    ds = ds.select(range(a.batch_size))
    out = tempfile.mkdtemp(prefix="bench-check-")
    trainer = DPOTrainer(model=policy, ref_model=ref, args=_trl_args(a, out, "no"), train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(a.batch_size)])
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    same = [list(trainer.train_dataset[i]["chosen_ids"]) == e.chosen for i, e in enumerate(ex)]
    return {"dlma_loss": dlma_loss, "trl_loss": trl_loss, "same_token_ids": all(same)}


def spawn(role: str, a, data=None, **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", role, "--data", str(data or a.data), "--steps", str(a.steps),
           "--batch-size", str(a.batch_size), "--precision", a.precision, "--threads", str(a.threads),
           "--max-grad-norm", str(a.max_grad_norm), "--checkpointing", a.checkpointing]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{role} worker failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--words", type=int, default=30, help="query and responses cut to this many words (~65-token rows)")
    ap.add_argument("--precision", default="auto", help="auto (bf16 where supported), bf16 or no")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every worker")
    ap.add_argument("--repeats", type=int, default=1, help="alternate dlma and TRL runs this many times; fastest run of each counts")
    ap.add_argument("--max-grad-norm", type=float, default=0.0,
                    help="gradient clipping of both trainers (0: off, so dlma can step inside backward; 1.0: both defaults)")
    ap.add_argument("--checkpointing", default="dlma", choices=["dlma", "both", "none"],
                    help="gradient checkpointing: dlma only (TRL as a user runs it by default), both, or none")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        common_setup(a)
        result = {"dlma": worker_dlma, "trl": worker_trl, "check": worker_check, "refs": worker_refs}[a.worker](a)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    from dlma.models import bf16_supported
    import torch

    if a.precision == "auto":
        a.precision = "bf16" if bf16_supported(torch.device("cpu")) else "no"
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    a.data = work / "pairs.jsonl"
    make_pairs(a.data, a.steps * a.batch_size, a.words)
    tokens = count_tokens(a.data)
    print(f"{a.steps} steps x {a.batch_size} pairs, {tokens} tokens (chosen + rejected rows), precision {a.precision}")
    scored = spawn("refs", a)["path"]
    runs: dict[str, list[dict]] = {"dlma": [], "dlma-ref": [], "trl": []}
    for _ in range(a.repeats):  # interleaved, so a change in the machine's load hits both
        runs["dlma"].append(spawn("dlma", a, data=scored))  # reference log-probs from the scored file (the pipeline's path)
        runs["trl"].append(spawn("trl", a))
        runs["dlma-ref"].append(spawn("dlma", a))  # reference log-probs computed inside the timed run
    for name, rs in runs.items():
        secs = " ".join(f"{r['seconds']:.1f}" for r in rs)
        mbs = " ".join(f"{r['peak_rss_mb']:.0f}" for r in rs)
        print(f"{name:8s} seconds per run: {secs}  peak RSS MB: {mbs}")
    best = {k: min(rs, key=lambda r: r["seconds"]) for k, rs in runs.items()}
    peak = {k: max(r["peak_rss_mb"] for r in rs) for k, rs in runs.items()}
    d, d2, t = best["dlma"], best["dlma-ref"], best["trl"]
    print(f"dlma settings: step in backward {d['step_in_backward']}, shared context {d['share_context']}, "
          f"max_grad_norm {a.max_grad_norm} (both), gradient checkpointing: {a.checkpointing}, {a.threads} threads each")
    rows = (("dlma", "dlma", "reference from the scored file"), ("dlma", "dlma-ref", "reference computed in the run"),
            ("trl", "trl", "reference model, TRL default"))
    for name, k, how in rows:
        r = best[k]
        print(f"{name:5s} {tokens / r['seconds']:8.1f} tokens/s  {r['seconds']:7.1f} s  peak RSS {peak[k]:7.0f} MB  ({how})")
    c = spawn("check", a, policy=d["out"])
    print(f"first-batch float32 DPO loss: dlma {c['dlma_loss']:.6f}  trl {c['trl_loss']:.6f}  "
          f"difference {abs(c['dlma_loss'] - c['trl_loss']):.2e}  (same token ids: {c['same_token_ids']})")
    print(f"speed_ratio_incl_reference={t['seconds'] / d2['seconds']:.2f}")
    print(f"memory_ratio_incl_reference={peak['dlma-ref'] / peak['trl']:.2f}")
    print(f"speed_ratio={t['seconds'] / d['seconds']:.2f}")
    print(f"memory_ratio={peak['dlma'] / peak['trl']:.2f}")


if __name__ == "__main__":
    main()
