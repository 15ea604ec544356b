"""Loading the embedded model: the cached float32 directory vs dequantising the GGUF.

Baseline: transformers' GGUF loader (what every load would cost without dlma's cache).
Prints both times and, last, `ratio=<baseline seconds over cached seconds>`.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from dlma.models import embedded_gguf_path, embedded_model_dir, load_model

    logging.disable_progress_bar()
    embedded_model_dir()  # build the cache first if needed (not timed)
    t = time.perf_counter()
    model, tok = load_model("embedded", dtype="float32", device="cpu")
    cached = time.perf_counter() - t
    del model
    gguf = embedded_gguf_path()
    t = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    baseline = time.perf_counter() - t
    print(f"dlma load_model('embedded') from the cache: {cached:.2f} s (imports already done)")
    print(f"transformers GGUF load + dequantise:        {baseline:.2f} s")
    print(f"ratio={baseline / cached:.1f}")


if __name__ == "__main__":
    main()
