"""`dlma run`'s whole configuration checked before any model loads.

Everything a run reads is looked at first: the prompt files (every record parsed), the presets and
their detectors, the presets the training terms apply to, the evaluation prompts and preset, and
the models (the starting model, which is also the baseline, and a perplexity reference). A mistake
found here costs a second; found by the stage that reads it, it cost the stages before. Each
problem is one line that says which setting is wrong and how `dlma run` sets it right. Torch is
never imported here.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import RunConfig, spelling
from .data import load_eval_prompts, read_pairs, read_prompts
from .detectors import for_preset
from .errors import DlmaError
from .locate import model_problem
from .prompts import Preset, load_preset, source_presets
from .stages import check_method, evaluate_config, presets, train_config
from .terms import TERMS, check_presets_named, role_terms


def _items(spec: str | None) -> list[str]:
    return [x.strip() for x in (spec or "").split(",") if x.strip()]


def _fix(key: str, problem: str) -> DlmaError:
    """One line: the setting, what is wrong with it, and the option that sets it."""
    return DlmaError(f"{key}: {problem} (set it with {spelling(key)})")


def _guarded(key: str, check: Callable[[], object]) -> object:
    try:
        return check()
    except DlmaError as exc:
        raise _fix(key, str(exc)) from None


def _preset(key: str, name: str) -> Preset:
    """A preset that loads, with a detector that resolves (a user's function is imported now)."""
    preset = _guarded(key, lambda: load_preset(name))
    _guarded(key, lambda: for_preset(preset))
    return preset  # type: ignore[return-value]


def _model(key: str, name: str) -> None:
    problem = model_problem(name)
    if problem:
        raise _fix(key, problem)


def check_run(cfg: RunConfig) -> list[str]:
    """Raise a one-line DlmaError for the first problem of `cfg`; return notes worth printing (terms switched off)."""
    _guarded("method", lambda: check_method(cfg))
    sources, names = _items(cfg.generate.prompts), presets(cfg)
    if not sources:
        raise _fix("generate.prompts", "no prompts to align on")
    if not names:
        raise _fix("generate.preset", "no preset")
    _guarded("generate.preset", lambda: source_presets(sources, names))
    for source in sources:
        if not _guarded("generate.prompts", lambda source=source: read_prompts(source, cfg.generate.limit)):
            raise _fix("generate.prompts", f"{source} holds no usable prompts")
    roles = {name: _preset("generate.preset", name).role for name in names}

    tcfg = train_config(cfg)
    if tcfg.preset:
        _preset("train.preset", tcfg.preset)
    tcfg, notes = role_terms(tcfg, roles)
    for term, alpha, named, _, on in TERMS:
        try:
            check_presets_named(names, "this run (generate.preset)", f"train.{named}",
                                getattr(tcfg, named) if getattr(tcfg, alpha) else [], term, lambda p, on=on: on(tcfg, p))
        except DlmaError as exc:
            raise DlmaError(f"{exc} (--set train.{named}=[NAME,...]), or turn the term off (--set train.{alpha}=0)") from None
    if cfg.train.select_prompts:
        _guarded("train.select_prompts", lambda: load_eval_prompts(cfg.train.select_prompts, cfg.train.select_limit))
    if cfg.score.preset:
        _preset("score.preset", cfg.score.preset)

    ecfg = evaluate_config(cfg)
    if not _items(ecfg.prompts):
        raise _fix("evaluate.prompts", "no held-out prompts to evaluate on")
    _guarded("evaluate.prompts", lambda: load_eval_prompts(ecfg.prompts, ecfg.limit))
    _preset("evaluate.preset", ecfg.preset)
    if ecfg.pairs:
        _guarded("evaluate.pairs", lambda: read_pairs(ecfg.pairs, ecfg.pairs_limit))

    _model("model.model", cfg.model.model)
    for key, name in (("evaluate.reference", ecfg.reference), *(("evaluate.judge", spec.partition(":")[2])
                                                              for spec in ecfg.judge if spec.split(":")[0] in ("llm", "reward", "cost"))):
        if name:
            _model(key, name)
    return [f"train: {n}" for n in notes]
