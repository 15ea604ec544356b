"""benchmarks/gpu.py at its tiny CPU shape: the script a GPU run uses, exercised end to end here.

Every stage (dlma's generate, score and train on a random model saved like a user's) must report a
positive finite tokens/s and a peak memory, training also its steps after the first; the random
model's next-token entropy is brought to a trained model's; --profile prints each stage's top
operators; the ratio lines against TRL come last (nan where TRL is not installed), and the work
directory (model, pairs, trained weights) is removed afterwards.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
STAGE = re.compile(r"^stage=(\w+) tokens_per_s=(\S+) mfu=(\S+) peak_memory_mb=(\S+)$")


def test_gpu_benchmark_tiny_runs_every_stage(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    res = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--profile"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    lines = res.stdout.strip().splitlines()
    stages = {m[1]: m for m in map(STAGE.match, lines) if m}
    assert {"generate", "score", "train", "train_steady"} <= set(stages), res.stdout
    m = re.search(r"next-token entropy (\S+) nats at temperature 0.7, a trained model's \((\S+)\)", res.stdout)
    assert m and abs(float(m[1]) - float(m[2])) < 0.05, res.stdout[:2000]
    for stage in ("generate", "score", "train"):
        assert f"profile of {stage} (torch.profiler" in res.stdout and "aten::mm" in res.stdout, stage
    for name, m in stages.items():
        tps, mfu, mem = (float(x) for x in m.groups()[1:])
        assert math.isfinite(tps) and tps > 0, (name, m[0])
        assert math.isfinite(mfu) and mfu > 0, (name, m[0])
        assert math.isfinite(mem) and mem > 0, (name, m[0])
    assert "MFU divides by" in res.stdout and "peak RSS" in res.stdout  # the peak named; CPU memory is RSS
    speed, memory = lines[-2:]
    assert re.fullmatch(r"speed_ratio=(nan|\d+\.\d+)", speed) and re.fullmatch(r"memory_ratio=(nan|\d+\.\d+)", memory), lines[-3:]
    if speed.endswith("nan"):  # no TRL here: the reason is printed just before
        assert lines[-3].startswith("TRL side not run: "), lines[-3:]
    else:
        assert "trl_train" in stages
    assert not list(tmp_path.glob("dlma-bench-gpu-*")), "work directory left behind"


def test_gpu_suite_script_runs_its_four_commands_at_the_tiny_shape(tmp_path):
    """benchmarks/gpu_suite.sh is a GPU's whole measurement in under 10 minutes: tried here with --tiny, each
    of its four gpu.py commands must finish (rc 0) and leave its stage lines in the summary."""
    script = SCRIPT.parent / "gpu_suite.sh"
    logs = tmp_path / "logs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(["bash", str(script), "--tiny", "embedded", str(logs)], cwd=SCRIPT.parents[1], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = (logs / "summary.txt").read_text()
    runs = re.findall(r"^== (\S+) \(rc (\d+)\): gpu\.py (.*)$", summary, re.M)
    assert [name for name, _, _ in runs] == ["smollm2-profile", "smollm2-compile", "llama8b", "smollm2-b32"], summary
    for name, rc, _ in runs:
        assert rc == "0", (name, (logs / f"{name}.log").read_text()[-3000:])
        log = (logs / f"{name}.log").read_text()
        assert {"generate", "score", "train"} <= {m[1] for m in map(STAGE.match, log.splitlines()) if m}, (name, log[-2000:])
        assert re.search(r"^speed_ratio=", log, re.M) and re.search(r"^memory_ratio=", log, re.M), name
    assert "torch.compile True" in (logs / "smollm2-compile.log").read_text()
    assert "micro tokens 8192" in (logs / "smollm2-b32.log").read_text()
    assert (logs / "versions.txt").read_text().count("\n") >= 7  # commit, then a line per package
