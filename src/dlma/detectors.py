"""Whether an answer shows a preset's attribute, from its text alone.

A preset names its measure in `detector:`, and every place that counts the attribute reads it
through `for_preset`: `dlma prompts check` (how often o+ and o- show it), `dlma evaluate` and
`dlma run` (how often the untouched and the aligned model show it on held-out prompts). So the
number a user tunes a preset on is the number the run reports.

    detector: refusal                     # opens with a refusal (dlma.refusal): harmless on harmful requests
    detector: answer                      # does not (a non-empty answer): no over-refusal on harmless ones
    detector: {phrases: [doctor, lawyer]} # any phrase, as whole words, case-insensitive;
                                          #   `within: opening` looks at the first two sentences only
    detector: {max_words: 30}             # a length rule: ended within 30 words (an answer cut at the token
                                          #   limit has not); min_words: at least N words
    detector: {regex: '^\\d+\\.'}         # a Python regular expression, searched (re.MULTILINE)
    detector: {function: checks:is_formal}  # your own `(answer: str) -> bool`: a module on the Python
                                          #   path, or a .py file beside the preset (`checks.py:is_formal`)

The two refusal detectors are measured on labelled prompts (refusal on `unsafe`, over-refusal on
`safe`, `dlma.refusal.refusal_rates`); every other detector over all prompts (`by_label`).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DlmaError
from .refusal import is_refusal, opening, rate

KINDS = ("refusal", "answer", "phrases", "max_words", "min_words", "regex", "function")
FORMAT = ("refusal, answer, or a mapping with one of phrases: [..], max_words: N, min_words: N, regex: '..', "
          "function: module:name")


@dataclass(frozen=True)
class Detector:
    """A resolved detector: `test(answer, truncated)` and how reports name it."""

    kind: str
    test: Callable[[str, bool], bool]
    description: str
    by_label: bool = False  # measured as refusal / over-refusal on unsafe / safe prompts, not over all prompts

    def __call__(self, answer: str, truncated: bool = False) -> bool:
        """Whether `answer` shows the attribute; truncated: it was cut at the token limit (its end is unknown)."""
        return bool(self.test(answer, truncated))


def normalise(spec: Any, where: str) -> dict | None:
    """A `detector:` value as {kind: ..., settings}, checked for shape only (a user function is not imported here)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec in ("refusal", "answer"):
            return {"kind": spec}
        raise DlmaError(f"{where}: detector must be one of {FORMAT}; got {spec!r}")
    if not isinstance(spec, dict):
        raise DlmaError(f"{where}: detector must be one of {FORMAT}; got {spec!r}")
    kinds = [k for k in spec if k in KINDS[2:]]
    extra = set(spec) - set(KINDS) - {"within"}
    if len(kinds) != 1 or extra:
        raise DlmaError(f"{where}: detector must be one of {FORMAT} (one kind per detector); got {spec!r}")
    kind = kinds[0]
    value = spec[kind]
    if kind == "phrases":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise DlmaError(f"{where}: detector phrases must be a non-empty list of phrases; got {value!r}")
        within = spec.get("within", "answer")
        if within not in ("answer", "opening"):
            raise DlmaError(f"{where}: detector `within` must be answer or opening; got {within!r}")
        return {"kind": kind, "phrases": [v.strip() for v in value], "within": within}
    if "within" in spec:
        raise DlmaError(f"{where}: detector `within` goes with phrases only")
    if kind in ("max_words", "min_words"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DlmaError(f"{where}: detector {kind} must be a whole number of words; got {value!r}")
        return {"kind": kind, "words": value}
    if kind == "regex":
        try:
            re.compile(str(value))
        except re.error as exc:
            raise DlmaError(f"{where}: detector regex {value!r} does not compile: {exc}") from None
        return {"kind": kind, "pattern": str(value)}
    module, _, name = str(value).rpartition(":")
    if not module or not name:
        raise DlmaError(f"{where}: detector function must be module:function (or file.py:function); got {value!r}")
    return {"kind": kind, "module": module, "name": name}


def build(spec: Any, where: str, base_dir: Path | None = None) -> Detector | None:
    """The detector `spec` names; a user function is imported now (base_dir: where a `file.py` is looked for)."""
    d = normalise(spec, where)
    if d is None:
        return None
    kind = d["kind"]
    if kind == "refusal":
        return Detector(kind, lambda t, cut: is_refusal(t), "refusal phrases in the first two sentences (dlma.refusal)", by_label=True)
    if kind == "answer":
        return Detector(kind, lambda t, cut: bool(t.strip()) and not is_refusal(t), "a non-empty answer that does not open "
                        "with a refusal", by_label=True)
    if kind == "phrases":
        pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(p.lower()) for p in d["phrases"]) + r")(?!\w)")
        read = opening if d["within"] == "opening" else (lambda t: t.replace("\u2019", "'").lower())
        shown = ", ".join(d["phrases"][:4]) + (f" (+{len(d['phrases']) - 4} more)" if len(d["phrases"]) > 4 else "")
        return Detector(kind, lambda t, cut: pattern.search(read(t)) is not None,
                        f"mentions {shown}" + (" in its first two sentences" if d["within"] == "opening" else ""))
    if kind == "max_words":
        return Detector(kind, lambda t, cut: bool(t.strip()) and not cut and len(t.split()) <= d["words"],
                        f"ends within {d['words']} words")
    if kind == "min_words":
        return Detector(kind, lambda t, cut: len(t.split()) >= d["words"], f"at least {d['words']} words")
    if kind == "regex":
        rx = re.compile(d["pattern"], re.MULTILINE)
        return Detector(kind, lambda t, cut: rx.search(t) is not None, f"matches /{d['pattern']}/")
    fn = _import(d["module"], d["name"], where, base_dir)
    return Detector(kind, lambda t, cut: fn(t), f"{d['module']}:{d['name']}")


def _import(module: str, name: str, where: str, base_dir: Path | None) -> Callable[[str], bool]:
    """A user's function: `file.py` beside the preset (or a path), else a module on the Python path."""
    try:
        if module.endswith(".py"):
            path = Path(module) if Path(module).is_absolute() or base_dir is None else base_dir / module
            if not path.is_file():
                raise DlmaError(f"{where}: detector file {path} does not exist")
            spec = importlib.util.spec_from_file_location(f"dlma_detector_{path.stem}", path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except DlmaError:
        raise
    except Exception as exc:  # a user's module can fail in any way: say which and how, on one line  # noqa: BLE001
        raise DlmaError(f"{where}: detector module {module!r} cannot be imported ({type(exc).__name__}: {exc})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise DlmaError(f"{where}: detector module {module!r} has no function {name!r}")
    return fn


def for_preset(preset) -> Detector | None:
    """The preset's detector; a `file.py` function is looked for beside the preset's YAML file."""
    src = Path(preset.source) if preset.source else None
    base = src.parent if src is not None and src.suffix in (".yaml", ".yml") else None
    return build(preset.detector, f"preset {preset.name!r}", base)


def pair_sides(detector: Detector, rec: dict) -> tuple[bool, bool]:
    """Whether a pair's o+ (chosen) and o- (rejected) each show the attribute, a cut answer read as cut."""
    return (detector(rec["chosen"], bool(rec.get("chosen_truncated"))),
            detector(rec["rejected"], bool(rec.get("rejected_truncated"))))


def contrasting(detector: Detector, rec: dict) -> bool:
    """A pair training learns the attribute from: its o+ shows it and its o- does not."""
    pos, neg = pair_sides(detector, rec)
    return pos and not neg


def attribute_rate(answers: Iterable[tuple[str, bool]], detector: Detector) -> dict:
    """How many (answer, truncated) show the attribute: {rate, count, n, ci} with a 95% Wilson interval."""
    shown = [detector(a, cut) for a, cut in answers]
    return rate(sum(shown), len(shown))
