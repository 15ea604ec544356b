"""Kill anywhere: SIGKILL each stage at a random moment, rerun it, compare with an uninterrupted run.

For every trial a stage command (generate, score, train, evaluate, or `dlma run` across stage
boundaries) starts in a fresh output, is killed with SIGKILL after a random delay drawn from
[0, 1.1 x its uninterrupted wall time] (so some kills land while the model loads, some mid-write,
some after it finished), and is rerun to the end. The output must equal the uninterrupted one:
byte for byte for the files of generate, score and evaluate (a resumed stage recomputes a
partly written batch whole, so every record comes from the batch an uninterrupted run computes
it in), and with the same per-step losses, exactly, for training. Tiny sizes on the embedded model. The last line is the figure:

    failures=0 trials=100

    .venv/bin/python benchmarks/kill_anywhere.py [--trials 100] [--stages generate,score,train,evaluate,run] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DLMA = [sys.executable, "-m", "dlma.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
STAGES = ("generate", "score", "train", "evaluate", "run")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


class Stage:
    """One stage's command, where its output goes, and how two outputs are compared."""

    def __init__(self, name: str, work: Path):
        self.name, self.work = name, work
        pairs, scored = work / "ref-generate" / "out.jsonl", work / "ref-score" / "out.jsonl"
        small = ["--dtype", "float32", "--no-progress"]
        self.args = {
            "generate": ["generate", "--prompts", "harmful-train", "--preset", "harmless", "--limit", "6",
                         "--max-new-tokens", "12", "--batch-size", "4", *small],
            "score": ["score", "--data", str(pairs), "--batch-size", "2", *small],
            "train": ["train", "--data", str(scored), "--batch-size", "2", "--max-steps", "3", "--save-steps", "1",
                      "--lr", "1e-5", *small],
            "evaluate": ["evaluate", "--model", "embedded", "--prompts", "safety-val", "--limit", "3",
                         "--max-new-tokens", "12", "--batch-size", "2", "--judge", *small],
            "run": ["run", "--no-progress", "--set", "generate.limit=2", "--set", "generate.max_new_tokens=8",
                    "--set", "train.max_steps=2", "--set", "train.save_steps=1", "--set", "train.batch_size=2",
                    "--set", "evaluate.limit=2", "--set", "evaluate.max_new_tokens=8", "--set", "evaluate.judge=[]"],
        }[name]

    def command(self, out: Path) -> list[str]:
        if self.name == "run":
            return DLMA + self.args + ["--run-dir", str(out)]
        target = out / "out.jsonl" if self.name in ("generate", "score") else out
        return DLMA + self.args + ["--out", str(target)]

    def result(self, out: Path):
        """What must not depend on being killed: whole files, and training's per-step losses."""
        if self.name in ("generate", "score"):
            return _bytes(out / "out.jsonl")
        if self.name == "train":
            return _losses(out / "metrics.jsonl")
        if self.name == "evaluate":
            return [_bytes(out / f) for f in ("answers-aligned.jsonl", "answers-baseline.jsonl")]
        r1 = out / "round-1"
        return [_bytes(r1 / "generate" / "pairs.jsonl"), _bytes(r1 / "score" / "scored.jsonl"),
                _losses(r1 / "train" / "model" / "metrics.jsonl")]

    def parts(self) -> list[str]:
        """Names of the result's parts, for saying which one differs."""
        return {"evaluate": ["answers-aligned.jsonl", "answers-baseline.jsonl"],
                "run": ["pairs.jsonl", "scored.jsonl", "training losses"]}.get(self.name, ["output"])


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _jsonl(path)]


def run_to_end(cmd: list[str]) -> None:
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:5])} failed: {res.stderr.strip().splitlines()[-1:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100, help="trials in all, spread over the stages in turn")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    names = [s for s in args.stages.split(",") if s]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="dlma-kill-"))
    try:
        stages, ref, wall = {}, {}, {}
        for name in ("generate", "score", *[n for n in names if n not in ("generate", "score")]):
            st = Stage(name, work)
            t0 = time.time()
            run_to_end(st.command(work / f"ref-{name}"))
            stages[name], wall[name], ref[name] = st, time.time() - t0, st.result(work / f"ref-{name}")
            print(f"{name}: uninterrupted run {wall[name]:.1f} s", flush=True)
        counts = {n: [0, 0, 0] for n in names}  # trials, failures, killed before finishing
        for t in range(args.trials):
            name = names[t % len(names)]
            st, out = stages[name], work / f"trial-{t}"
            delay = rng.uniform(0, 1.1 * wall[name])
            proc = subprocess.Popen(st.command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                counts[name][2] += 1
            try:
                run_to_end(st.command(out))
                got = st.result(out)
                ok = got == ref[name]
                if not ok:
                    pairs = zip(got, ref[name]) if isinstance(got, list) and name in ("evaluate", "run") else [(got, ref[name])]
                    bad = [part for part, (a, b) in zip(st.parts(), pairs) if a != b]
                    detail = f"{', '.join(bad)} differ(s) from the uninterrupted run ({out})"
            except RuntimeError as exc:
                ok, detail = False, str(exc)
            counts[name][0] += 1
            counts[name][1] += int(not ok)
            print(f"trial {t + 1}: {name}, kill after {delay:.1f} s: {'ok' if ok else 'FAILED ' + detail}", flush=True)
            if ok:
                shutil.rmtree(out, ignore_errors=True)
        for n, (k, f, killed) in counts.items():
            print(f"{n}: {k} trials, {killed} killed before finishing, {f} failures")
        print(f"failures={sum(c[1] for c in counts.values())} trials={sum(c[0] for c in counts.values())}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
