"""`dlma run`: config, stages, resume after kills, lock, method comparison (tiny sizes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlma.cli import build_parser
from dlma.cli.run import resolve_config
from dlma.errors import DlmaError

DLMA = [sys.executable, "-m", "dlma.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--set", "generate.limit=5", "--set", "generate.num_pairs=1", "--set", "generate.max_new_tokens=12",
        "--set", "generate.batch_size=4",
        "--set", "score.batch_size=1", "--set", "train.max_steps=6", "--set", "train.batch_size=2",
        "--set", "train.save_steps=2", "--set", "evaluate.limit=2", "--set", "evaluate.max_new_tokens=8",
        "--set", "model.dtype=float32"]


def _args(*argv: str):
    return build_parser().parse_args(["run", *argv])


def test_config_layers(tmp_path):
    from dlma.cli.run import shipped_defaults

    shipped = shipped_defaults()
    cfg = resolve_config(_args())
    assert cfg == shipped and cfg.method == "dlma" and "harmless" in cfg.generate.preset
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  beta: 0.3\ngenerate:\n  limit: 7\n")
    cfg = resolve_config(_args("--config", str(f), "--set", "train.beta=0.5", "--method", "rlcd"))
    assert (cfg.train.beta, cfg.generate.limit, cfg.method) == (0.5, 7, "rlcd")
    assert cfg.generate.preset == shipped.generate.preset  # untouched keys keep the shipped defaults
    with pytest.raises(DlmaError, match="unknown key 'betta'"):
        resolve_config(_args("--set", "train.betta=1"))
    with pytest.raises(DlmaError, match="not a valid float"):
        resolve_config(_args("--set", "train.beta=high"))


def test_print_config_round_trips(tmp_path):
    res = subprocess.run(DLMA + ["run", "--print-config", "--set", "rounds=2"], env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    f = tmp_path / "printed.yaml"
    f.write_text(res.stdout)
    assert resolve_config(_args("--config", str(f))).rounds == 2


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"dlma run ended before {path} appeared"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.1)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_kill_mid_scoring_and_mid_training_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    cmd = DLMA + ["run", "--run-dir", str(run_dir), "--no-progress", *TINY]
    r1 = run_dir / "round-1"

    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(r1 / "score" / "scored.jsonl", proc)
    while _lines(r1 / "score" / "scored.jsonl") < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (r1 / "score" / "done.json").exists(), "the kill should land mid-scoring"

    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(r1 / "train" / "started.json", proc)
    while not list((r1 / "train").glob("model/checkpoints/step-*/*")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (r1 / "train" / "done.json").exists(), "the kill should land mid-training"

    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refusals on harmful prompts" in done.stdout and "index.html" in done.stdout
    assert _lines(r1 / "generate" / "pairs.jsonl") == 10  # 5 harmful + 5 benign prompts
    scored = [json.loads(x)["id"] for x in (r1 / "score" / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 10 and len(set(scored)) == 10
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"round-1/generate", "round-1/score", "round-1/train", "round-1/evaluate"} <= set(manifest["stages"])
    assert manifest["versions"]["torch"] and "wall_s" in manifest["stages"]["round-1/train"]
    gen = manifest["stages"]["round-1/generate"]
    assert gen["pairs"] == 10 and gen["pairs_per_s"] > 0 and gen["tokens"] > 0 and gen["tokens_per_s"] > 0
    assert manifest["stages"]["round-1/score"]["pairs_per_s"] > 0 and manifest["stages"]["round-1/train"]["tokens_per_s"]
    assert "round-1/generate" in done.stdout and "pairs/s" in done.stdout and "tokens/s" in done.stdout

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final-model")
    assert model.config.model_type == "llama"

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stderr.count("skipping") == 4 and "starting" not in again.stderr
    speed = subprocess.run(cmd + ["--set", "generate.prefix_cache=false"], env=ENV, capture_output=True, text=True, timeout=600)
    assert speed.returncode == 0 and speed.stderr.count("skipping") == 4, "a speed-only setting must not redo stages"

    changed = subprocess.run(cmd + ["--set", "train.beta=0.3"], env=ENV, capture_output=True, text=True, timeout=1200)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "[round 1 generate] done already" in changed.stderr and "[round 1 score] done already" in changed.stderr
    assert "[round 1 train] settings changed" in changed.stderr


def test_second_concurrent_run_is_refused(tmp_path):
    from dlma.pipeline import run_lock

    with run_lock(tmp_path):
        res = subprocess.run(DLMA + ["run", "--run-dir", str(tmp_path), "--no-progress"], env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "in use by another dlma run" in res.stderr and "Traceback" not in res.stderr


def test_missing_prompt_file_names_the_stage(tmp_path):
    res = subprocess.run(DLMA + ["run", "--run-dir", str(tmp_path / "r"), "--no-progress",
                                 "--set", f"generate.prompts={tmp_path / 'nope.jsonl'}", "--set", "generate.preset=harmless"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "stage round 1 generate" in res.stderr and "nope.jsonl" in res.stderr


@pytest.mark.slow
def test_compare_puts_methods_side_by_side(tmp_path):
    run_dir = tmp_path / "cmp"
    res = subprocess.run(DLMA + ["run", "--run-dir", str(run_dir), "--compare", "dlma,rlcd", "--no-progress", *TINY,
                                 "--set", "train.max_steps=2"], env=ENV, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    for m in ("dlma", "rlcd"):
        assert (run_dir / m / "final-model" / "config.json").is_file()
    # rlcd reuses dlma's identical generation and scoring instead of redoing them
    assert "[round 1 generate] identical stage found in a sibling run" in res.stderr
    html = (run_dir / "report" / "index.html").read_text()
    assert "dlma" in html and "rlcd" in html
