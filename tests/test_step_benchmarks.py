"""The training-step benchmarks at their smallest: each must pass its own check and end with a ratio.

benchmarks/train_layout.py fails where the packed layout trains another model than one row per
pair; benchmarks/train_kl.py fails where the KL term is not 0 at the untouched weights;
benchmarks/compile.py fails where --torch-compile's layers train another model than eager ones. All run
the trainer's real code on the embedded model, so a change that breaks any check shows here.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, extra", [("train_layout.py", []), ("train_kl.py", ["--kl-tokens", "6"]), ("compile.py", [])])
def test_step_benchmark_passes_its_check_and_prints_a_ratio(script, extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(BENCH / script), "--steps", "3", "--batch-size", "4", *extra],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"ratio=(\S+)", last)
    assert m and math.isfinite(float(m[1])) and float(m[1]) > 0, res.stdout
    if script == "train_kl.py":  # every no-overrefusal pair of the sample held an untouched answer
        held = re.search(r"untouched answers: (\d+) of no-overrefusal prompts, (\d+) tokens", res.stdout)
        assert held and int(held[1]) > 0 and int(held[2]) <= 6 * int(held[1]), res.stdout
