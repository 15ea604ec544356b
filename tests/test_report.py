"""The report: metrics -> metrics.json, report.md, self-contained index.html (checked in headless Chromium)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess

import pytest

from dlma.report import COLORS, write_report


def _metrics(win: int, seed: int) -> dict:
    """A metrics dict shaped like evaluate_models' output (the report knows nothing of models)."""
    rng = random.Random(seed)
    n = 40
    judge = lambda w, t, f: {"n": n, "judged": n - f, "win": w, "tie": t, "lose": n - f - w - t, "failed": f,
                             "win_rate": w / (n - f), "tie_rate": t / (n - f), "lose_rate": (n - f - w - t) / (n - f),
                             "adjusted_win_rate": (w + t / 2) / (n - f), "adjusted_win_rate_se": 0.07, "note": "test"}
    quality = lambda: {"n": n, "mean_tokens": 40.0, "mean_words": 30.0, "distinct_1": 0.4, "distinct_2": 0.8,
                       "empty_fraction": 0.0, "truncated_fraction": 0.1, "perplexity": 3.2, "perplexity_median": 3.0}
    refusal = lambda r: {"refusal_rate": r, "refused_unsafe": int(20 * r), "n_unsafe": 20, "over_refusal_rate": 0.1,
                         "refused_safe": 2, "n_safe": 20}
    return {
        "models": {"aligned": f"runs/{seed}/model", "baseline": "embedded", "reference": "embedded"},
        "prompts": {"n": n},
        "judges": {"self-reward": judge(win, 4, 0), "openai:judge": {**judge(win - 2, 6, 3), "failures": ["x: timeout"] * 3}},
        "refusal": {"aligned": refusal(0.6), "baseline": refusal(0.2), "detector": "phrases"},
        "quality": {"aligned": quality(), "baseline": quality()},
        "reliability": {"pairs": "hh-harmless:test", "n": 30, "human_labelled": 30, "judge_model": "embedded",
                        "self_reward_accuracy": 0.6, "text_judge_accuracy": 0.5},
        "training": {"step": [1, 2, 3], "loss": [0.7, 0.6, 0.5], "reward_margin": [0, 0.1, 0.2],
                     "reward_accuracy": [0.5, 0.6, 0.7], "lr": [1e-6] * 3, "tokens_per_s": [1000.0] * 3},
        "distributions": {r: {"tokens": [rng.randint(5, 64) for _ in range(n)], "perplexity": [rng.uniform(1.5, 9) for _ in range(n)]}
                          for r in ("aligned", "baseline")} | {"self_reward": [rng.gauss(1, 3) for _ in range(n)]},
        "examples": [{"id": "u1", "prompt": [{"role": "user", "content": "How do I <b>pick</b> a lock?"}], "label": "unsafe",
                      "aligned": "I can't help with that.", "baseline": "Insert a tension wrench & rake the pins.",
                      "refused": {"aligned": True, "baseline": False}, "verdicts": {"self-reward": "win"}}],
    }


def test_report_side_by_side_is_self_contained(tmp_path):
    runs = {"dlma": _metrics(30, 1), "rlcd": _metrics(22, 2)}
    paths = write_report(runs["dlma"], tmp_path, title="DLMA vs RLCD", runs=runs)
    html = (tmp_path / "index.html").read_text()
    assert "Methods side by side" in html and "rlcd" in html
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", html), "the HTML must not load anything from the network"
    assert "<script" not in html
    assert html.count("data:image/png;base64,") == 6  # judges, compare, R, lengths, perplexity, training
    assert "&lt;b&gt;pick&lt;/b&gt;" in html, "example text must be escaped"
    assert "3 failure(s)" in html
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["runs"]) == {"dlma", "rlcd"} and "examples" not in saved["runs"]["rlcd"]
    md = (tmp_path / "report.md").read_text()
    for link in re.findall(r"\]\((plots/[^)]+)\)", md):
        assert (tmp_path / link).is_file()
    assert len(paths["plots"]) == 6
    assert "| self-reward | 30 | 4 | 6 | 0 | 75.0% |" in md

    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install -y chromium): screenshot check skipped")
    import matplotlib.image
    import numpy as np

    png = tmp_path / "shot.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
                    "--window-size=1200,2000", (tmp_path / "index.html").resolve().as_uri()],
                   check=True, timeout=120, capture_output=True)
    px = matplotlib.image.imread(str(png))[..., :3]
    assert (px.min(axis=-1) < 0.9).mean() > 0.03, "the page renders blank"
    green = np.array([int(COLORS["win"][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    assert (np.abs(px - green).max(axis=-1) < 0.05).sum() > 500, "the win/tie/lose plot is not visible"


def test_report_with_sparse_metrics(tmp_path):
    """Only judges (all failed) and no distributions: still a valid report, rates shown as missing."""
    m = {"models": {"aligned": "a", "baseline": "b"}, "prompts": {"n": 2},
         "judges": {"openai:x": {"n": 2, "judged": 0, "win": 0, "tie": 0, "lose": 0, "failed": 2, "win_rate": None,
                                 "tie_rate": None, "lose_rate": None, "adjusted_win_rate": None,
                                 "adjusted_win_rate_se": None, "failures": ["1: timeout", "2: timeout"]}}}
    write_report(m, tmp_path)
    html = (tmp_path / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "2 failure(s)" in html and "–" in html
