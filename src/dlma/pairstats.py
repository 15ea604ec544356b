"""A pair file in numbers: counts, R's distribution and the contrast of each preset's pairs.

Pure functions over pair records (no model), shared by the score stage's trackers, the model
card and the pair dataset's card, so all three say the same thing about the same pairs.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Sequence

from .errors import DlmaError
from .detectors import contrasting, for_preset
from .prompts import load_preset
from .refusal import rate


def quantiles(xs: Sequence[float]) -> dict:
    s = sorted(xs)
    q = lambda p: s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]
    return {"min": s[0], "p10": q(0.1), "p25": q(0.25), "median": q(0.5), "p75": q(0.75), "p90": q(0.9), "max": s[-1]}


def contrast(records: Sequence[dict]) -> dict[str, dict]:
    """Per preset with a detector: the pairs whose o+ shows the attribute and whose o- does not
    (the pairs training learns the attribute from). Presets that cannot be loaded here are left out."""
    out: dict[str, dict] = {}
    for name in sorted({str(r.get("preset")) for r in records if r.get("preset")}):
        try:
            shows = for_preset(load_preset(name))
        except DlmaError:
            continue
        if shows is not None:
            mine = [r for r in records if r.get("preset") == name]
            out[name] = rate(sum(contrasting(shows, r) for r in mine), len(mine))
    return out


def pair_stats(records: Sequence[dict]) -> dict:
    """Counts, R's quantiles (where scored) and contrast of in-memory pair records (`data.read_pairs`)."""
    out: dict = {"pairs": len(records), "presets": dict(Counter(str(r.get("preset")) for r in records)),
                 "truncated": {k: sum(bool(r.get(f"{k}_truncated")) for r in records) for k in ("chosen", "rejected")}}
    rs = [float(r["self_reward"]) for r in records if isinstance(r.get("self_reward"), (int, float))]
    if rs:
        out["self_reward"] = {"mean": statistics.fmean(rs), "quantiles": quantiles(rs),
                              "positive": rate(sum(x > 0 for x in rs), len(rs))}
    out["contrast"] = contrast(records)
    return out
