"""Each stage's settings as `dlma run` runs it, from one run configuration.

The pipeline takes its stages' settings from here, and so do the stage commands given
`--config FILE` or `--recipe NAME`: `dlma generate/score/train/evaluate --recipe safety` then
generate, score, train and evaluate exactly as `dlma run --recipe safety` does. Kept free of
torch, so a configuration is checked in well under a second.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import SAMPLING_OF, EvalConfig, GenerateConfig, RunConfig, ScoreConfig, TrainConfig
from .errors import DlmaError
from .objectives import method, objective

# The preset `dlma evaluate` measures and judges with when nothing names one (no --preset, no recipe).
FALLBACK_EVAL_PRESET = "harmless"


def presets(cfg: RunConfig) -> list[str]:
    """The run's presets (generate.preset), in the order of its prompt sources."""
    return [p.strip() for p in cfg.generate.preset.split(",") if p.strip()]


def check_method(cfg: RunConfig) -> None:
    """The run's shape: a known method, at least one round, and best-of-K generation for a method that ranks K responses."""
    if cfg.rounds < 1:
        raise DlmaError("rounds must be at least 1")
    spec = method(cfg.method)
    if objective(spec.loss).responses == "ranked" and cfg.generate.num_samples < 2:
        raise DlmaError(f"method {cfg.method} ranks the K responses of each side: set generate.num_samples "
                        f"to 2 or more (it is {cfg.generate.num_samples})")


def generate_config(cfg: RunConfig, rnd: int = 1) -> GenerateConfig:
    """Round `rnd` samples from a seed of its own (the run's seed in the first round)."""
    return dataclasses.replace(cfg.generate, seed=cfg.generate.seed + rnd - 1)


def score_config(cfg: RunConfig) -> ScoreConfig | None:
    """The method's judge; None for a method that scores nothing (context distillation)."""
    spec = method(cfg.method)
    if spec.judge is None:
        return None
    return dataclasses.replace(cfg.score, judge=spec.judge)


def sampling_of(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The sampling settings `stage` reads (config.SAMPLING_OF): part of its key, so that changing one
    redoes the stages that read it and no other."""
    return {k: getattr(cfg.sampling, k) for k in SAMPLING_OF[stage]}


def train_config(cfg: RunConfig) -> TrainConfig:
    """The training settings of cfg.method: its objective, and the run's other settings.

    min_reward, flip_negative, reward_norm and shuffle_reward select pairs by the self-reward R, so they apply only
    to methods that use R (`Method.selects_by_reward`): RLCD trains on the contrastive pairs as they come, context
    distillation scores nothing and RLAIF's text judge orients its pairs. The NLL and KL terms stay only where the
    method's objective takes them (`Objective.terms`).
    """
    spec = method(cfg.method)
    obj = objective(spec.loss)
    single = cfg.generate.preset if "," not in cfg.generate.preset else None  # a `plain` preset changes the bare template
    changes: dict[str, Any] = {"loss": spec.loss, "preset": cfg.train.preset or single}
    if not spec.selects_by_reward:
        changes.update(min_reward=None, flip_negative=False, reward_norm="none", shuffle_reward=False)
    if not obj.takes("nll"):
        changes.update(rpo_alpha=0.0)
    if not obj.takes("nll_whole"):
        changes.update(rpo_whole=False)
    if not obj.takes("kl"):
        changes.update(kl_alpha=0.0)
    return dataclasses.replace(cfg.train, **changes)


def evaluate_config(cfg: RunConfig) -> EvalConfig:
    """Evaluation measures and judges with the run's first preset unless evaluate.preset names one:
    a run aligning to `concise` reports how concise its answers are, not how often they refuse."""
    return dataclasses.replace(cfg.evaluate, preset=cfg.evaluate.preset or (presets(cfg) or [FALLBACK_EVAL_PRESET])[0])
