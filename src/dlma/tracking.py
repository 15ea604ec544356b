"""Where a stage reports while it runs: TensorBoard or Weights & Biases, through accelerate's trackers.

Every stage (generate, score, train, evaluate) takes `report_to` and builds its trackers here, so
they are one mechanism: training hands the same tracker objects to its Accelerator, the other
stages drive them through `Tracking`. A run has a project (the run directory's name in `dlma run`)
and each stage its own run in it (`round-1/score`); TensorBoard writes to LOGGING_DIR/RUN, so one
`tensorboard --logdir RUN_DIR/tensorboard` shows every stage of every round. Settings are logged
typed (numbers stay numbers), flattened to `section.field`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import DlmaError

TRACKERS = ("tensorboard", "wandb")
LOGGING_DIR = "tensorboard"  # under a stage's output (or the run directory)


@dataclass(frozen=True)
class Where:
    """Names and place of one stage's tracker run."""

    project: str  # W&B project
    run: str  # this stage's run: TensorBoard subdirectory, W&B run name
    logging_dir: Path  # TensorBoard writes to logging_dir / run

    @classmethod
    def beside(cls, out: str | Path, stage: str, *, file: bool) -> "Where":
        """A stage command's own: FOLDER/tensorboard/STAGE-NAME, FOLDER the output directory (or the
        output file's folder) and NAME the output's name."""
        out = Path(out)
        return cls("dlma", f"{stage}-{out.name.split('.')[0]}", (out.parent if file else out) / LOGGING_DIR)


def installed(report_to: Sequence[str], stage: str = "dlma") -> list[str]:
    """The --report-to trackers that are installed (a missing one is said, not fatal; `none` is none)."""
    out = []
    for name in report_to:
        if name == "none":
            continue
        if name not in TRACKERS:
            raise DlmaError(f"--report-to: unknown tracker {name!r}; choose tensorboard, wandb or none")
        module = "tensorboard" if name == "tensorboard" else "wandb"
        if importlib.util.find_spec(module) is not None:
            out.append(name)
        else:
            print(f"dlma {stage}: {name} is not installed (pip install 'dlma[tracking]'); not logging to it",
                  file=sys.stderr)
    return out


def make_trackers(report_to: Sequence[str], where: Where, stage: str) -> list:
    """accelerate tracker objects for `report_to`, not started yet."""
    names = installed(report_to, stage)
    if not names:
        return []
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    out = []
    for name in names:
        if name == "tensorboard":
            tracker = TensorBoardTracker(where.run, where.logging_dir)
        else:
            tracker = WandBTracker(where.project, name=where.run, dir=str(where.logging_dir.parent))
        out.append(tracker)
    return out


def process_state(device: str) -> None:
    """accelerate's process state, which its trackers need, set up as training's Accelerator will
    (on the CPU where the stage's model runs there), so the two agree within one `dlma run`."""
    import torch
    from accelerate import PartialState

    PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def typed_settings(**sections: Any) -> dict[str, Any]:
    """Config dataclasses (or dicts) flattened to {section.field: value} with the types trackers
    keep: numbers, bools and strings as they are, None as "none", lists and mappings as JSON."""
    out: dict[str, Any] = {}
    for section, obj in sections.items():
        data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
        for key, value in data.items():
            name = f"{section}.{key}" if section else key
            if isinstance(value, (bool, int, float, str)):
                out[name] = value
            elif value is None:
                out[name] = "none"
            else:
                out[name] = json.dumps(value, sort_keys=True, default=str)
    return out


class Tracking:
    """One stage's trackers: scalars, histograms and tables; all no-ops when none is asked for."""

    def __init__(self, report_to: Sequence[str], where: Where, stage: str, settings: dict[str, Any] | None = None,
                 device: str = "auto"):
        self.trackers = make_trackers(report_to, where, stage)
        if self.trackers:
            process_state(device)
        for tracker in self.trackers:
            tracker.start()
            if settings:
                tracker.store_init_configuration(settings)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        values = {k: v for k, v in values.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def histogram(self, name: str, values: Sequence[float], step: int | None = None) -> None:
        if not values:
            return
        import numpy as np

        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.tracker.add_histogram(name, np.asarray(values, dtype=np.float64), global_step=step)
                tracker.tracker.flush()
            else:
                import wandb

                tracker.log({name: wandb.Histogram(list(values))}, step=step)

    def table(self, name: str, head: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """A table: Markdown text for TensorBoard, a wandb.Table for W&B."""
        from .report import md_table

        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log({name: md_table(head, rows)}, step=step)
            else:
                tracker.log_table(name, columns=[str(c) for c in head], data=rows, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
