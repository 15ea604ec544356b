"""Phrasing as an axis: the bundled sets in five phrasings, selectors on them, per-phrasing rates."""

from __future__ import annotations

import json

import pytest

from dlma.data import PHRASINGS, load_eval_prompts, read_prompts
from dlma.errors import DlmaError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _phrased(tmp_path, requests: int, label: str = "unsafe", categories=("a", "b")):
    rows = []
    for i in range(requests):
        for ph in PHRASINGS:
            rows.append({"id": f"{label}{i}@{ph}", "request": f"{label}{i}", "phrasing": ph, "original": ph == "question",
                         "prompt": f"request {i} asked as {ph}", "label": label, "category": categories[i % len(categories)]})
    return _write(tmp_path / f"{label}.jsonl", rows)


def test_selectors_pick_the_original_one_phrasing_or_a_balanced_rotation(tmp_path):
    path = _phrased(tmp_path, 20)
    assert len(read_prompts(str(path))) == 100
    originals = read_prompts(f"{path}:original")
    assert [p.extra["phrasing"] for p in originals] == ["question"] * 20
    assert {p.extra["phrasing"] for p in read_prompts(f"{path}:story")} == {"story"}
    rotated = read_prompts(f"{path}:rotate")
    assert len(rotated) == 20 and len({p.extra["request"] for p in rotated}) == 20  # one phrasing per request
    for cat in ("a", "b"):  # each category deals the five phrasings in turn: 10 requests, 2 of each
        counts = [sum(p.extra["phrasing"] == ph and p.extra["category"] == cat for p in rotated) for ph in PHRASINGS]
        assert counts == [2] * 5, (cat, counts)
    assert [p.id for p in read_prompts(f"{path}:rotate")] == [p.id for p in rotated]  # deterministic
    assert len(read_prompts(f"{path}:rotate", limit=3)) == 3


def test_a_selector_on_a_set_without_phrasings_is_one_clear_error(tmp_path):
    plain = _write(tmp_path / "plain.jsonl", [{"id": "a", "prompt": "hi"}])
    with pytest.raises(DlmaError, match="plain.jsonl:rotate.*needs every record to carry `request` and `phrasing`"):
        read_prompts(f"{plain}:rotate")


def test_an_evaluation_limit_keeps_whole_requests_and_balances_labels(tmp_path):
    unsafe, safe = _phrased(tmp_path, 10, "unsafe"), _phrased(tmp_path, 10, "safe")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(unsafe.read_text() + safe.read_text())
    got = load_eval_prompts(str(mixed), 20)
    assert len(got) == 20 and sum(p.label == "unsafe" for p in got) == 10
    by_request: dict[str, set] = {}
    for p in got:
        by_request.setdefault(p.extra["request"], set()).add(p.extra["phrasing"])
    assert all(v == set(PHRASINGS) for v in by_request.values()) and len(by_request) == 4


def test_phrasing_rates_report_each_phrasing_the_mean_and_the_worst():
    from dlma.data import PromptRecord
    from dlma.evaluate import phrasing_rates

    prompts, answers = [], {"aligned": {}, "baseline": {}}
    refuse, comply = "I'm sorry, but I can't help with that.", "Sure, here you go."
    for i in range(4):
        for ph in PHRASINGS:
            for label in ("unsafe", "safe"):
                pid = f"{label}{i}@{ph}"
                prompts.append(PromptRecord(pid, [{"role": "user", "content": pid}], label,
                                            {"request": f"{label}{i}", "phrasing": ph, "original": ph == "imperative"}))
                # aligned: refuses harmful requests except short questions (half of them), refuses one harmless story
                refused = (label == "unsafe" and (ph != "question" or i < 2)) or (label == "safe" and ph == "story" and i == 0)
                answers["aligned"][pid] = {"answer": refuse if refused else comply}
                answers["baseline"][pid] = {"answer": comply}
    out = phrasing_rates(prompts, answers)
    assert out["phrasings"] == list(PHRASINGS)
    assert out["rates"]["question"]["aligned"]["refusal_rate"] == 0.5
    assert out["rates"]["original wording"]["aligned"]["refusal_rate"] == 1.0  # the imperatives here
    s = out["summary"]["aligned"]
    assert s["refusal_rate"]["worst"] == 0.5 and s["refusal_rate"]["worst_phrasing"] == "question"
    assert s["refusal_rate"]["mean"] == pytest.approx(0.9)
    assert s["over_refusal_rate"]["worst"] == 0.25 and s["over_refusal_rate"]["worst_phrasing"] == "story"
    assert out["summary"]["baseline"]["refusal_rate"]["mean"] == 0.0


def test_the_bundled_sets_hold_every_request_in_every_phrasing_once():
    for name in ("harmful-train", "benign-train", "safety-val", "safety-test"):
        prompts = read_prompts(name)
        by: dict[str, list[str]] = {}
        for p in prompts:
            by.setdefault(p.extra["request"], []).append(p.extra["phrasing"])
        assert all(sorted(v) == sorted(PHRASINGS) for v in by.values()), name
        assert sum(p.extra["original"] for p in prompts) == len(by), name
        assert len({p.prompt[-1]["content"] for p in prompts}) == len(prompts), name
