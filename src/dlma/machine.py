"""What machine this is: the CPU's kind, and its measured matmul peak (what MFU divides by).

Timings differ by a factor of ~90 between CPUs with and without fast bf16, so every figure dlma
prints names the CPU kind, and a stage's share of the machine is measured against a matmul
this machine actually runs, not a datasheet number.
"""

from __future__ import annotations

import os
import platform
import time

import torch


def cpu_kind() -> str:
    """The CPU's model name and whether it runs bf16 matmuls fast (AMX / avx512_bf16) or not (AVX2-only)."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("unknown CPU", "x86_64", ""):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if "amx_bf16" in flags:
        kind = "AMX + avx512_bf16 (fast bf16)"
    elif "avx512_bf16" in flags:
        kind = "avx512_bf16, no AMX (fast bf16)"
    elif "avx512f" in flags:
        kind = "AVX-512 without bf16 (bf16 slow)"
    elif "avx2" in flags:
        kind = "AVX2-only (bf16 slow)"
    else:
        kind = "no AVX2/AVX-512 flags found"
    try:
        mkldnn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn = False
    return f"{name}; {kind}; torch mkldnn bf16: {mkldnn}; {os.cpu_count()} cores"


def matmul_peak(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seconds: float = 0.4) -> float:
    """FLOP/s of large square matmuls in `dtype` on `device`, with the threads torch uses now.

    The best of repeated timed runs (after a warm-up) over about `seconds`: the rate the model's
    own matmuls could reach at best, so stage FLOPs over wall time divided by it is an MFU.
    """
    device = torch.device(device)
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2 * n ** 3 / best


def param_count(model) -> int:
    """Parameters of the model (under a DDP/accelerate wrapper: of its module)."""
    model = getattr(model, "module", model)
    return sum(p.numel() for p in model.parameters())


def matmul_params(model) -> tuple[int, int]:
    """(decoder body, output layer): the parameters a position's forward multiplies by in each.

    The input embedding is a table lookup and costs no FLOPs, and dlma runs the output layer only
    where logits are needed (predicting positions, the last prefill position), so 2 N per token
    over all N parameters overstates the work: the embedded model's tied embedding is 21% of its
    135M parameters. A model without the usual accessors counts everything as body."""
    model = getattr(model, "module", model)
    total = param_count(model)
    try:
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return total, 0
    ew, hw = getattr(emb, "weight", None), getattr(out, "weight", None)
    if ew is None or hw is None:
        return total, 0
    return total - ew.numel() - (0 if hw is ew else hw.numel()), hw.numel()


def forward_flops(model, positions: int, head_positions: int) -> int:
    """Matmul FLOPs of a forward over `positions` token positions through the decoder body, of which
    `head_positions` also go through the output layer (2 per weight per position; attention's own
    score products left out, as is usual for MFU). A training step is three times this."""
    body, head = matmul_params(model)
    return 2 * (body * positions + head * head_positions)
