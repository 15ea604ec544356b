"""Attribute detectors: each kind, a user's function, and the one detector check and evaluate share."""

from __future__ import annotations

import pytest

from dlma.contrast import summarize_contrast
from dlma.detectors import attribute_rate, build, for_preset
from dlma.errors import DlmaError
from dlma.evaluate import attribute_rates
from dlma.prompts import load_preset, preset_from_dict

SIDES = {"positive": {"instruction": "Be brief."}, "negative": {"instruction": "Ramble."}}


def _preset(tmp_path, detector, name="mine"):
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "attribute": "brief", **SIDES, "detector": detector}))
    return load_preset(str(path))


def test_each_built_in_kind():
    phrases = build({"phrases": ["see a doctor", "GP"]}, "t")
    assert phrases("You should See a Doctor soon.") and phrases("Ask your GP.")
    assert not phrases("GPS tracking is fine.")  # whole words only
    assert phrases("Ask your GP\u2019s nurse.")  # curly apostrophes read as straight ones
    opening = build({"phrases": ["doctor"], "within": "opening"}, "t")
    assert opening("Rest. See a doctor.") and not opening("Rest. Drink water. Then see a doctor.")
    short = build({"max_words": 5}, "t")
    assert short("One two three four five.") and not short("One two three four five six.")
    assert not short("One two.", True)  # cut at the token limit: its end is unknown, so it did not end short
    assert not short("   ")
    assert build({"min_words": 3}, "t")("one two three")
    numbered = build({"regex": r"^\d+\."}, "t")
    assert numbered("Steps:\n1. Boil water.") and not numbered("Boil water.")
    refusal, answer = build("refusal", "t"), build("answer", "t")
    assert refusal("I'm sorry, but I can't help with that.") and not answer("I'm sorry, but I can't help with that.")
    assert answer("Sure: boil it.") and not answer("")
    assert refusal.by_label and answer.by_label and not phrases.by_label
    assert build(None, "t") is None


@pytest.mark.parametrize("spec,says", [
    ("toxicity", "detector must be one of"),
    ({"phrases": []}, "non-empty list"),
    ({"max_words": "ten"}, "whole number"),
    ({"regex": "(unclosed"}, "does not compile"),
    ({"function": "nocolon"}, "module:function"),
    ({"phrases": ["a"], "max_words": 3}, "one kind per detector"),
    ({"max_words": 3, "within": "opening"}, "`within` goes with phrases only"),
])
def test_bad_detectors_fail_when_the_preset_loads(spec, says):
    with pytest.raises(DlmaError, match=says):
        preset_from_dict({"name": "x", **SIDES, "detector": spec}, "x.yaml")


def test_a_users_function_from_a_file_beside_the_preset_or_a_module(tmp_path, monkeypatch):
    (tmp_path / "checks.py").write_text("def formal(answer):\n    return 'dear' in answer.lower()\n")
    shows = for_preset(_preset(tmp_path, {"function": "checks.py:formal"}))
    assert shows("Dear Sir, ...") and not shows("hey there") and shows.description == "checks.py:formal"
    monkeypatch.syspath_prepend(str(tmp_path))
    assert for_preset(_preset(tmp_path, {"function": "checks:formal"}, "by-module"))("Dear all")
    with pytest.raises(DlmaError, match="has no function 'casual'"):
        for_preset(_preset(tmp_path, {"function": "checks.py:casual"}, "missing"))
    with pytest.raises(DlmaError, match="cannot be imported"):
        for_preset(_preset(tmp_path, {"function": "no_such_module_here:f"}, "nomodule"))


def test_rate_has_a_wilson_interval():
    r = attribute_rate([("a b", False), ("a b c d e f", False), ("a", True), ("a b c", False)], build({"max_words": 3}, "t"))
    assert (r["count"], r["n"], r["rate"]) == (2, 4, 0.5)
    lo, hi = r["ci"]
    assert 0.1 < lo < 0.5 < hi < 0.9


def test_check_and_evaluate_count_with_the_same_detector(tmp_path):
    """`dlma prompts check` (o+ / o-) and `dlma evaluate` (before / after) read the preset's own detector."""
    from dlma.data import PromptRecord

    preset = _preset(tmp_path, {"max_words": 4})
    recs = [{"id": str(i), "prompt_id": str(i), "prompt": [{"role": "user", "content": f"q{i}"}], "chosen": c,
             "rejected": r, "chosen_truncated": ct, "rejected_truncated": False, "self_reward": 1.0}
            for i, (c, ct, r) in enumerate([("Short one.", False, "A much longer answer than that."),
                                            ("Short but cut", True, "Also a very long answer here."),
                                            ("Tiny.", False, "Tiny too.")])]
    s = summarize_contrast(preset, recs)
    assert s["detector"] == "ends within 4 words"
    assert s["positive"]["shows_attribute"]["count"] == 2 and s["negative"]["shows_attribute"]["count"] == 1
    assert s["contrast"]["count"] == 1
    prompts = [PromptRecord(r["id"], r["prompt"]) for r in recs]
    answers = {"aligned": {r["id"]: {"answer": r["chosen"], "truncated": r["chosen_truncated"]} for r in recs},
               "baseline": {r["id"]: {"answer": r["rejected"], "truncated": False} for r in recs}}
    a = attribute_rates(preset, prompts, answers)
    assert (a["aligned"]["count"], a["baseline"]["count"], a["detector"]) == (2, 1, "ends within 4 words")
    assert attribute_rates(load_preset("harmless"), prompts, answers) is None  # refusal: the labelled refusal rates


def test_the_attribute_is_reported_before_and_after():
    """The terminal table and the seed comparison carry the attribute row; refusal rows only where prompts are labelled."""
    from dlma.pipeline import format_compare, format_table, seed_spread
    from dlma.refusal import rate, refusal_rates
    from dlma.report import quality_table

    def metrics(after: int) -> dict:
        q = {"perplexity": 2.0, "mean_tokens": 30.0, "distinct_2": 0.5}
        return {"attribute": {"preset": "concise", "attribute": "concise", "detector": "ends within 30 words",
                              "baseline": rate(3, 100), "aligned": rate(after, 100)},
                "refusal": {r: refusal_rates(["x"] * 3, [None] * 3) for r in ("aligned", "baseline")},
                "quality": {"aligned": q, "baseline": q}}

    table = format_table(metrics(40))
    assert "concise: ends within 30 words (higher is better)  3.0% (3/100) [1.0-8.5]  40.0% (40/100) [30.9-49.8]" in table
    assert "refusals on harmful prompts" not in table and "answer perplexity" in table
    runs = {"dlma": dict(metrics(40), seeds=seed_spread([metrics(40), metrics(50)], [0, 1]))}
    compare = format_compare(runs)
    assert "shows the attribute" in compare and "45.0% (sd 7.1)" in compare and "harmful refused" not in compare
    assert quality_table(metrics(40))[1][0][1].startswith("40.0% (40/100) [95% CI 30.9-49.8%]")
