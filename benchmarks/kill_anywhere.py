"""Kill anywhere: SIGKILL each stage at a random moment, rerun it, compare with an uninterrupted run.

For every trial a stage command (generate, score, train, evaluate, or `dlma run` across stage
boundaries) starts in a fresh output, is killed with SIGKILL after a random delay drawn from
[0, 1.1 x its uninterrupted wall time] (so some kills land while the model loads, some mid-write,
some after it finished), and is rerun to the end. The output must equal the uninterrupted one:
byte for byte for the files of generate, score and evaluate (a resumed stage recomputes a
partly written batch whole, so every record comes from the batch an uninterrupted run computes
it in), and with the same per-step losses, exactly, for training. Tiny sizes on the embedded model.

Two more kinds of trial misuse an output instead of killing it, alternately with generate and score:

  writers  a second process writes the same output, started after a random delay, while the first
           is killed at another: the second must finish it or be refused at once ("is being written
           by another dlma process"), and after a rerun the output holds the uninterrupted run's
           records, each once (two writers appended every record twice).
  edited   the stage is killed at a random moment, then its input is edited (the last prompt's text,
           or the last pair's chosen answer) and the stage rerun: it must refuse, naming the edited
           record, where that record was already written (the output is then as it was), or else
           give what an uninterrupted run on the edited input gives, never a stale record. (These two
           compare records, texts exact and numbers to 1e-4: see same_records.)

The last line is the figure (a stale or lost result counts as a failure):

    failures=0 trials=100

    .venv/bin/python benchmarks/kill_anywhere.py [--trials 100] [--stages generate,score,train,evaluate,run,writers,edited] [--seed 0]
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
from typing import Callable

DLMA = [sys.executable, "-m", "dlma.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
STAGES = ("generate", "score", "train", "evaluate", "run")
MISUSE = ("writers", "edited")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


class Stage:
    """One stage's command, where its output goes, and how two outputs are compared."""

    def __init__(self, name: str, work: Path, source: Path | None = None):
        """source: the stage's input file instead of its usual one (generate's prompts, score's pairs)."""
        self.name, self.work = name, work
        pairs, scored = source or work / "ref-generate" / "out.jsonl", work / "ref-score" / "out.jsonl"
        small = ["--dtype", "float32", "--no-progress"]
        self.args = {
            "generate": ["generate", "--prompts", str(source or "harmful-train"), "--preset", "harmless", "--limit", "6",
                         "--max-new-tokens", "12", "--batch-size", "4", *small],
            "score": ["score", "--data", str(pairs), "--batch-size", "2", *small],
            "train": ["train", "--data", str(scored), "--batch-size", "2", "--max-steps", "3", "--save-steps", "1",
                      "--lr", "1e-5", *small],
            "evaluate": ["evaluate", "--model", "embedded", "--prompts", "safety-val", "--limit", "3",
                         "--answer-tokens", "12", "--batch-size", "2", "--judge", *small],
            "run": ["run", "--no-progress", "--set", "generate.limit=2", "--set", "sampling.max_new_tokens=8",
                    "--set", "train.max_steps=2", "--set", "train.save_steps=1", "--set", "train.batch_size=2",
                    "--set", "evaluate.limit=2", "--set", "sampling.answer_tokens=8", "--set", "evaluate.judge=[]"],
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


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL proc after `delay` seconds unless it ended first; whether it was killed."""
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _close(a, b) -> bool:
    """The same JSON value, numbers to 1e-4 relative."""
    if isinstance(a, float) or isinstance(b, float):
        return all(isinstance(x, (int, float)) for x in (a, b)) and abs(a - b) <= 1e-4 * max(1.0, abs(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_close, a, b))
    return a == b


def same_records(got: bytes | None, ref: bytes | None) -> bool:
    """The same records in the same order, each once, texts exact and numbers to 1e-4: what two
    writers or an edited input could break. (Float sums of two separate processes may differ in the
    last digits: MKL does not promise equal bits from one run to the next; a loaded machine gave an
    uninterrupted run log-probs 1e-6 off. The kill trials, where it has not shown, stay exact.)"""
    if got is None or ref is None:
        return got == ref
    g, r = ([json.loads(x) for x in b.splitlines()] for b in (got, ref))
    return len(g) == len(r) and all(map(_close, g, r))


def compare(st: Stage, out: Path, ref, close: bool = False) -> tuple[bool, str]:
    got = st.result(out)
    if got == ref or close and same_records(got, ref):
        return True, ""
    pairs = zip(got, ref) if isinstance(got, list) and st.name in ("evaluate", "run") else [(got, ref)]
    bad = [part for part, (a, b) in zip(st.parts(), pairs) if a != b]
    return False, f"{', '.join(bad)} differ(s) from the uninterrupted run ({out})"


def kill_trial(st: Stage, out: Path, ref, wall: float, rng: random.Random) -> tuple[bool, str, bool]:
    """Kill the stage at a random moment, rerun it to the end: (ok, what went wrong, killed)."""
    killed = kill_after(subprocess.Popen(st.command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                        rng.uniform(0, 1.1 * wall))
    run_to_end(st.command(out))
    return (*compare(st, out, ref), killed)


def writers_trial(st: Stage, out: Path, ref, wall: float, rng: random.Random) -> tuple[bool, str, bool]:
    """A second writer of the same output starts after a random delay; the first is killed at another."""
    first = subprocess.Popen(st.command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, kill = sorted(rng.uniform(0, 1.1 * wall) for _ in range(2))
    time.sleep(start)
    second = subprocess.Popen(st.command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = kill_after(first, kill - start)
    err = second.communicate(timeout=1800)[1].strip().splitlines()
    if second.returncode not in (0, 2) or second.returncode == 2 and "is being written by another dlma process" not in err[-1]:
        return False, f"the second writer ended with {second.returncode}: {err[-1:]}", killed
    run_to_end(st.command(out))
    return (*compare(st, out, ref, close=True), killed)


def edited_trial(st: Stage, out: Path, ref_edited, wall: float, rng: random.Random, source: Path,
                 edit: Callable[[Path], str]) -> tuple[bool, str, bool]:
    """Kill the stage at a random moment, edit its input, rerun: refused where the edited record was
    written already (the output then as it was), else exactly the edited input's uninterrupted result."""
    killed = kill_after(subprocess.Popen(st.command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                        rng.uniform(0, 1.1 * wall))
    before = _bytes(out / "out.jsonl")
    edited_id = edit(source)
    res = subprocess.run(st.command(out), env=ENV, capture_output=True, text=True, timeout=1800)
    if res.returncode == 0:
        ok, detail = compare(st, out, ref_edited, close=True)
        return ok, detail and f"stale: {detail}", killed
    written = {json.loads(x).get("prompt_id", json.loads(x)["id"]) for x in (before or b"").decode().splitlines()}
    if res.returncode == 2 and "as it was before" in res.stderr and edited_id in written and _bytes(out / "out.jsonl") == before:
        return True, "refused: the edited record was written before the edit", killed
    return False, f"rerun ended with {res.returncode} ({res.stderr.strip().splitlines()[-1:]}; edited record written: "\
                  f"{edited_id in written})", killed


def edit_last(path: Path, field: str, suffix: str) -> str:
    """Append `suffix` to the last record's `field` (a prompt's text, a pair's chosen answer), a string
    or chat messages (then to the last message's text); its id."""
    recs = _jsonl(path)
    if isinstance(recs[-1][field], list):
        recs[-1][field][-1]["content"] += suffix
    else:
        recs[-1][field] += suffix
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(recs[-1]["id"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100, help="trials in all, spread over the stages in turn")
    ap.add_argument("--stages", default=",".join(STAGES + MISUSE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    names = [s for s in args.stages.split(",") if s]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="dlma-kill-"))
    try:
        stages, ref, wall = {}, {}, {}
        for name in ("generate", "score", *[n for n in names if n not in ("generate", "score") + MISUSE]):
            st = Stage(name, work)
            t0 = time.time()
            run_to_end(st.command(work / f"ref-{name}"))
            stages[name], wall[name], ref[name] = st, time.time() - t0, st.result(work / f"ref-{name}")
            print(f"{name}: uninterrupted run {wall[name]:.1f} s", flush=True)
        inputs = _edited_inputs(work) if "edited" in names else {}
        counts = {n: [0, 0, 0] for n in names}  # trials, failures, killed before finishing
        for t in range(args.trials):
            name = names[t % len(names)]
            base = ("generate", "score")[counts[name][0] % 2] if name in MISUSE else name
            st, out = stages[base], work / f"trial-{t}"
            try:
                if name == "writers":
                    ok, detail, killed = writers_trial(st, out, ref[base], wall[base], rng)
                elif name == "edited":
                    source, edit, ref_edited = inputs[base]
                    trial_input = work / f"trial-{t}-input.jsonl"
                    shutil.copy(source, trial_input)
                    ok, detail, killed = edited_trial(Stage(base, work, trial_input), out, ref_edited, wall[base], rng,
                                                      trial_input, edit)
                else:
                    ok, detail, killed = kill_trial(st, out, ref[name], wall[name], rng)
            except RuntimeError as exc:
                ok, detail, killed = False, str(exc), False
            counts[name][0] += 1
            counts[name][1] += int(not ok)
            counts[name][2] += int(killed)
            what = f"{name} ({base})" if name in MISUSE else name
            said = ("ok" + (f" ({detail})" if detail else "")) if ok else "FAILED " + detail
            print(f"trial {t + 1}: {what}{', killed' if killed else ''}: {said}", flush=True)
            if ok:
                shutil.rmtree(out, ignore_errors=True)
        for n, (k, f, killed) in counts.items():
            print(f"{n}: {k} trials, {killed} killed before finishing, {f} failures")
        print(f"failures={sum(c[1] for c in counts.values())} trials={sum(c[0] for c in counts.values())}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _edited_inputs(work: Path) -> dict:
    """Per stage: the input file an edited trial starts from, how it is edited, and the result of an
    uninterrupted run on the edited input."""
    from dlma.data import read_prompts

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt[-1]["content"]}) + "\n"
                               for p in read_prompts("harmful-train", 6)))
    out = {"generate": (prompts, lambda p: edit_last(p, "prompt", " Answer in one sentence.")),
           "score": (work / "ref-generate" / "out.jsonl", lambda p: edit_last(p, "chosen", " (edited)"))}
    for name, (source, edit) in out.items():
        edited = work / f"edited-{name}-input.jsonl"
        shutil.copy(source, edited)
        edit(edited)
        st = Stage(name, work, edited)
        run_to_end(st.command(work / f"ref-edited-{name}"))
        out[name] = (source, edit, st.result(work / f"ref-edited-{name}"))
    return out


if __name__ == "__main__":
    main()
