"""A full disk and an unwritable output: one clear line, and nothing half-written to resume from."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

DLMA = [sys.executable, "-m", "dlma.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
GEN = ["generate", "--prompts", "hh-harmless", "--limit", "6", "--max-new-tokens", "8", "--dtype", "float32",
       "--no-progress"]


def _limit_file_size(nbytes: int):
    def apply() -> None:  # like `ulimit -f`: writes past nbytes fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def test_a_full_disk_stops_with_one_line_and_the_rerun_resumes(tmp_path, embedded):
    # `embedded` makes sure the model cache exists: under the limit only the pair file is written.
    full, clean = tmp_path / "full.jsonl", tmp_path / "clean.jsonl"
    res = subprocess.run(DLMA + GEN + ["--out", str(full)], env=ENV, capture_output=True, text=True, timeout=600,
                         preexec_fn=_limit_file_size(2500))
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and last.startswith("dlma generate: error: no room to write"), res.stderr
    data = full.read_bytes()
    assert data.endswith(b"\n") or not data  # the failed record was undone, not left half-written
    kept = [json.loads(line) for line in data.splitlines()]
    assert len(kept) < 6
    # Rerun with room: it resumes, and the file equals one made without interruption.
    assert subprocess.run(DLMA + GEN + ["--out", str(full)], env=ENV, capture_output=True, timeout=600).returncode == 0
    assert subprocess.run(DLMA + GEN + ["--out", str(clean)], env=ENV, capture_output=True, timeout=600).returncode == 0
    # byte for byte: the partly written batch was generated again whole, so log-probs round the same way
    assert full.read_bytes() == clean.read_bytes()


def test_an_unwritable_output_is_one_line():
    probe = Path("/sys/dlma-write-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here")
    res = subprocess.run(DLMA + GEN + ["--out", "/sys/dlma-out/pairs.jsonl"], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("dlma generate: error: cannot write (/sys/dlma-out)")


def test_kill_anywhere_script_small():
    """The kill-anywhere suite (benchmarks/kill_anywhere.py) at its smallest: two random kills of scoring."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_anywhere.py"
    res = subprocess.run([sys.executable, str(script), "--trials", "2", "--stages", "score", "--seed", "1"], env=ENV,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "failures=0 trials=2", res.stdout
