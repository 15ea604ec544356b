"""Which training step to keep: greedy refusal probes on a labelled validation split.

At 135M parameters one training run is one draw: two data orders of the same settings ended
20 points apart in refusals and 5-10 in over-refusals (docs/tuning.md). The push a run gets by
its last step is partly luck; the steps before it are the same run with less push. Probing a
few late steps on validation prompts (never the test split) and keeping the step with the best
balanced score whose over-refusal stays under a cap turns "where this draw ended" into "the
best point of this draw's path", which is early stopping on a validation split.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data import load_eval_prompts, replacing, write_json
from ..errors import DlmaError
from ..generate import SamplingParams, TransformersBackend
from ..refusal import refusal_rates

HISTORY = "selection.json"
WEIGHTS = "selected-weights.pt"


@dataclass
class Probe:
    step: int
    refusal: float
    over_refusal: float
    n_unsafe: int
    n_safe: int
    seconds: float

    @property
    def balanced(self) -> float:
        return self.refusal - self.over_refusal


def probe_steps(total: int, every: int, start: float) -> list[int]:
    """The final step and every `every`-th step before it, from fraction `start` of the run on."""
    first = max(1, math.ceil(start * total))
    return sorted(s for s in range(total, first - 1, -every))


def best(history: Sequence[Probe], max_over_refusal: float) -> Probe:
    """The highest balanced score among probes within the over-refusal cap; if none is
    within it, the probe that over-refuses least (ties: the later step)."""
    within = [p for p in history if p.over_refusal <= max_over_refusal + 1e-12]
    if within:
        return max(within, key=lambda p: (p.balanced, p.step))
    return min(history, key=lambda p: (p.over_refusal, -p.step))


class Selector:
    """Probes the model at `probe_steps`, keeps the best weights on disk, restores them at the end."""

    def __init__(self, cfg, tok, renderer, out: Path, total: int, resumed: Path | None = None, *, probe_tokens: int = 24):
        self.cfg, self.tok, self.renderer, self.out, self.probe_tokens = cfg, tok, renderer, out, probe_tokens
        self.prompts = load_eval_prompts(cfg.select_prompts, cfg.select_limit)
        labels = {p.label for p in self.prompts}
        if not {"unsafe", "safe"} <= labels:
            raise DlmaError(f"--select-prompts {cfg.select_prompts}: needs prompts labelled unsafe and safe "
                            f"(found labels {sorted(map(str, labels))}), e.g. safety-val")
        self.steps = set(probe_steps(total, cfg.select_every, cfg.select_from))
        self.history: list[Probe] = []
        # The probes and kept weights are part of the training state: a run resumed from a
        # checkpoint takes them from that checkpoint (later probes are redone identically).
        for name in (HISTORY, WEIGHTS):
            (out / name).unlink(missing_ok=True)
        if resumed is not None and (resumed / HISTORY).is_file():
            self.history = [Probe(**p) for p in json.loads((resumed / HISTORY).read_text())["probes"]]
            if (resumed / WEIGHTS).is_file():
                _link(resumed / WEIGHTS, out / WEIGHTS)
        self.kept = self._kept_step()

    def _kept_step(self) -> int | None:
        if not self.history:
            return None
        return best(self.history, self.cfg.select_max_over_refusal).step

    def due(self, step: int) -> bool:
        return step in self.steps

    @torch.inference_mode()
    def probe(self, step: int, model) -> Probe:
        """Greedy answers of the current weights to the validation prompts, scored by the refusal detector."""
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:  # a fresh backend: a cached prefix belongs to the weights it was computed with
            backend = TransformersBackend(model, self.tok, self.cfg.select_batch_size)
            contexts = [self.renderer.context_ids(p.prompt, "bare") for p in self.prompts]
            samples = backend.sample(contexts, SamplingParams(self.probe_tokens, 0.0, 1.0, 0))
        finally:
            model.train(was_training)
        rates = refusal_rates([self.tok.decode(s.ids, skip_special_tokens=True) for s in samples],
                              [p.label for p in self.prompts])
        p = Probe(step, rates["refusal_rate"], rates["over_refusal_rate"], rates["n_unsafe"], rates["n_safe"],
                  round(time.perf_counter() - t0, 2))
        self.history = [h for h in self.history if h.step != step] + [p]
        self.kept = self._kept_step()
        if self.kept == step:
            self.keep(model)
        write_json(self.out / HISTORY, self.summary())
        return p

    def keep(self, model) -> None:
        """Save the weights of the step just probed; replaced atomically, so a kill leaves the previous best whole."""
        with replacing(self.out / WEIGHTS) as tmp:
            torch.save({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, tmp)

    def save_state(self, checkpoint: Path) -> None:
        """Put the probes and the kept weights into a checkpoint directory (a hard link where possible)."""
        write_json(checkpoint / HISTORY, self.summary())
        if (self.out / WEIGHTS).is_file():
            _link(self.out / WEIGHTS, checkpoint / WEIGHTS)

    def restore(self, model, final_step: int) -> None:
        """Load the kept step's weights into `model` when it is not the final step."""
        if self.kept is None or self.kept == final_step:
            return
        path = self.out / WEIGHTS
        if not path.is_file():
            raise DlmaError(f"{path} is missing: the weights of step {self.kept}, chosen on {self.cfg.select_prompts}, "
                            "cannot be restored; train again into another --out")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def cleanup(self) -> None:
        """The kept weights are in the final model once it is saved."""
        (self.out / WEIGHTS).unlink(missing_ok=True)

    def summary(self) -> dict:
        return {"prompts": self.cfg.select_prompts, "limit": self.cfg.select_limit,
                "max_new_tokens": self.probe_tokens, "max_over_refusal": self.cfg.select_max_over_refusal,
                "rule": "highest refusal - over-refusal with over-refusal <= max_over_refusal, else the lowest over-refusal",
                "probes": [asdict(p) for p in sorted(self.history, key=lambda p: p.step)], "kept_step": self.kept}


def _link(src: Path, dst: Path) -> None:
    """dst becomes src's content: a hard link (the kept weights are replaced, never edited, so
    a link keeps the old content), or a copy where the filesystem has no links."""
    with replacing(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
