"""Resumable training: checkpoints, the settings they were written with, and a finished run's summary.

A checkpoint (model, optimizer and RNG states via accelerate, sharded under FSDP/DeepSpeed) is
complete once its trainer_state.json is written, last; it holds the resume key, so a rerun with
other settings is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..config import SAMPLING_OF, ModelConfig, SamplingConfig, TrainConfig
from ..data import file_hashes, write_json, write_text
from ..errors import DlmaError

SUMMARY = "train_summary.json"
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"
# Fields that may change between a run and its resume without changing the result.
RESUME_FREE = ("save_steps", "save_total_limit", "log_steps", "report_to", "step_in_backward", "torch_compile")


def resume_key(cfg: TrainConfig, model_cfg: ModelConfig, data: str, world: int, sampling: SamplingConfig) -> dict:
    key = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    key.update({k: getattr(sampling, k) for k in SAMPLING_OF["train"]})  # the lengths training reads
    key["margin_clip"] = list(cfg.margin_clip)
    # the pair file by its content too: one grown or edited since is other data, never resumed as the same
    return {"train": key, "model": asdict(model_cfg), "data": os.path.abspath(data), "data_content": file_hashes(data),
            "global_batch": cfg.batch_size * cfg.grad_accum * world}


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (its trainer_state.json is written last)."""
    done = [p for p in (out / "checkpoints").glob("step-*") if (p / STATE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def finished_summary(out: Path, key: dict) -> dict | None:
    """The summary of a run already finished in `out` with these settings; None where none finished."""
    if not (out / SUMMARY).is_file():
        return None
    summary = json.loads((out / SUMMARY).read_text())
    if summary.get("resume_key") != key:
        why = "from another version of the pair file" if _only_data_differs(summary.get("resume_key"), key) else "with other settings"
        raise DlmaError(f"{out} already holds a model trained {why}; choose another --out")
    return summary


def _only_data_differs(old: dict | None, new: dict) -> bool:
    return isinstance(old, dict) and {k: v for k, v in old.items() if k != "data_content"} == \
        {k: v for k, v in new.items() if k != "data_content"}


def checkpoint_to_resume(out: Path, key: dict) -> Path | None:
    """The checkpoint to resume from, which must have been written with these settings."""
    ckpt = last_checkpoint(out)
    if ckpt is not None:
        saved = json.loads((ckpt / STATE).read_text())
        if saved.get("resume_key") != key:
            if _only_data_differs(saved.get("resume_key"), key):
                raise DlmaError(f"{ckpt} was trained on another version of the pair file (it changed since); "
                                "choose another --out")
            raise DlmaError(f"{ckpt} was written with other settings (or another number of processes x batch); "
                            f"rerun with the same flags to resume, or choose another --out")
    return ckpt


def save_checkpoint(accelerator, out: Path, step: int, key: dict, limit: int,
                    extra: Callable[[Path], None] | None = None) -> None:
    """Model, optimizer and RNG states via accelerate (sharded under FSDP/DeepSpeed), then
    `extra` (the selection's probes), the state file last; older checkpoints beyond `limit` go."""
    path = out / "checkpoints" / f"step-{step}"
    # torch.save, not safetensors: tied embeddings share storage, which safetensors refuses.
    accelerator.save_state(str(path), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(path)
        write_json(path / STATE, {"step": step, "resume_key": key})
        done = sorted((p for p in (out / "checkpoints").glob("step-*") if (p / STATE).is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[: max(0, len(done) - max(1, limit))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, out: Path, ckpt: Path | None) -> int:
    """Restore `ckpt`'s model, optimizer and RNG states and return its step (0 without one);
    metrics.jsonl is cut back to that step, so the log reads as one run."""
    step = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / STATE).read_text())["step"]
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        # Drop log lines past the checkpoint (and a line a kill cut short). Replaced atomically,
        # so a kill here keeps the old log whole.
        metrics = out / METRICS
        kept = []
        if step and metrics.is_file():
            kept = [ln for ln in metrics.read_text().splitlines() if _logged_step(ln) <= step]
        write_text(metrics, "".join(ln + "\n" for ln in kept))
    return step


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line that is not a whole record."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def write_summary(out: Path, summary: dict) -> None:
    """train_summary.json: written last, it marks the run finished."""
    write_json(out / SUMMARY, summary)


def read_metrics(out: Path) -> list[dict]:
    """Every logged step of the run in `out`, resumed parts included."""
    path = out / METRICS
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def starting_model(model: str) -> str | None:
    """The model a trained directory was aligned from, read from its train_summary.json and followed
    back through earlier rounds (each round trains the last one's model); None where `model` holds no
    summary (it was not trained by dlma)."""
    seen, name = set(), None
    path = Path(model)
    while (path / SUMMARY).is_file() and path.resolve() not in seen:
        seen.add(path.resolve())
        name = json.loads((path / SUMMARY).read_text()).get("resume_key", {}).get("model", {}).get("model")
        if not name:
            return None
        path = Path(name)
    return name
