"""`dlma prompts check`: the contrast summary (pure) and the command on the embedded model."""

from __future__ import annotations

import json

import pytest

from dlma.contrast import demonstration_words, leaked_words, summarize_contrast
from dlma.errors import DlmaError
from dlma.prompts import load_preset, preset_from_dict


def _rec(i: int, query: str, chosen: str, rejected: str, r: float, cut: bool = False) -> dict:
    return {"id": str(i), "prompt_id": str(i), "prompt": [{"role": "user", "content": query}], "chosen": chosen,
            "rejected": rejected, "chosen_truncated": cut, "rejected_truncated": False, "self_reward": r}


REFUSE, COMPLY = "I'm sorry, but I can't help with that.", "Sure, here is how you do it step by step."


def test_summary_counts_attribute_contrast_and_agreement():
    recs = [_rec(0, "q0", REFUSE, COMPLY, 12.0),        # contrasting, R agrees
            _rec(1, "q1", REFUSE, COMPLY, -3.0),        # contrasting, R disagrees
            _rec(2, "q2", COMPLY, REFUSE, 4.0, cut=True),  # reversed, R disagrees with the detector
            _rec(3, "q3", REFUSE, REFUSE, 1.0)]         # both refuse: the detector cannot tell them apart
    s = summarize_contrast(load_preset("harmless"), recs)
    assert s["positive"]["shows_attribute"]["count"] == 3 and s["negative"]["shows_attribute"]["count"] == 2
    assert s["contrast"]["count"] == 2 and s["contrast"]["n"] == 4
    assert s["self_reward"]["agrees_with_detector"]["count"] == 1 and s["self_reward"]["agrees_with_detector"]["n"] == 3
    assert s["self_reward"]["positive"]["count"] == 3
    assert s["positive"]["truncated"]["count"] == 1
    lo, hi = s["contrast"]["ci"]
    assert lo < 0.5 < hi


def test_answer_detector_inverts_refusal_and_leakage_needs_a_word_the_query_lacks():
    p = load_preset("no-overrefusal")  # its demonstrations talk about fireworks, ports, mould...
    topic = demonstration_words(p)
    assert "fireworks" in topic and "sorry" not in topic and "that" not in topic
    assert leaked_words("Use a tripod for the fireworks.", "How do I bake bread?", topic) == {"fireworks", "tripod"}
    assert leaked_words("Use a tripod for the fireworks.", "How do I shoot fireworks on a tripod?", topic) == set()
    s = summarize_contrast(p, [_rec(0, "How do I bake bread?", "Mix flour, fireworks, water.", REFUSE, 5.0),
                               _rec(1, "How do I kill a frozen app?", REFUSE, "", -1.0)])
    assert s["positive"]["shows_attribute"]["count"] == 1          # an answer, not a refusal
    assert s["negative"]["shows_attribute"]["count"] == 0          # a refusal and an empty answer show nothing
    assert s["negative"]["empty"]["count"] == 1
    assert s["positive"]["leakage"]["count"] == 1
    assert s["positive"]["leaked_words"] == [["fireworks", 1], ["water", 1]]  # ties in alphabetical order


def test_unknown_detector_is_a_clear_error():
    with pytest.raises(DlmaError, match="detector must be one of"):
        preset_from_dict({"name": "x", "positive": {"instruction": "a"}, "negative": {"instruction": "b"},
                          "detector": "toxicity"}, "x.yaml")


def test_prompts_check_on_the_embedded_model(tmp_path, capsys):
    from dlma.cli import main

    out = tmp_path / "chk"
    args = ["prompts", "check", "harmless", "--dtype", "float32", "--limit", "3", "--max-new-tokens", "12",
            "--pairs", "hh-harmless:train", "--pairs-limit", "4", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "contrast: o+ shows the attribute" in table and "accuracy on hh-harmless:train" in table
    s = json.loads((out / "check.json").read_text())
    assert s["pairs"] == 3 and s["labelled"]["accuracy"]["n"] == 4
    assert (out / "check.png").read_bytes()[:4] == b"\x89PNG"
    scored = [json.loads(x) for x in (out / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 3
    assert all(r["preset"] == "harmless" and isinstance(r["self_reward"], float) for r in scored)
    # A rerun with a smaller --limit reuses the sampled pairs and reports only the prompts asked for.
    mtime = (out / "pairs.jsonl").stat().st_mtime_ns
    assert main(args[:6] + ["2"] + args[7:]) == 0
    assert json.loads((out / "check.json").read_text())["pairs"] == 2
    assert (out / "pairs.jsonl").stat().st_mtime_ns == mtime


def test_preset_round_trips_through_yaml_and_candidates_vary_one_thing(tmp_path):
    import yaml

    from dlma.search import candidates, preset_to_dict

    p = load_preset("harmless")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(preset_to_dict(p)))
    assert load_preset(str(path)) == p
    names = [n for n, _ in candidates(p)]
    assert names == ["as-is", "set-1-only", "set-2-only", "set-3-only", "one-demonstration", "instructions-only",
                     "demonstrations-only"]
    d = dict(candidates(p))
    assert d["set-2-only"]["demonstrations"] == [preset_to_dict(p)["demonstrations"][1]]
    assert "demonstrations" not in d["instructions-only"] and "positive" not in d["demonstrations-only"]


def test_prompts_search_chooses_on_one_sample_and_reports_on_another(tmp_path, capsys):
    from dlma.cli import main

    out = tmp_path / "search"
    assert main(["prompts", "search", "no-overrefusal", "--dtype", "float32", "--limit", "2", "--max-new-tokens", "8",
                 "--out", str(out), "--no-progress"]) == 0
    assert "Report sample" in capsys.readouterr().out
    s = json.loads((out / "search.json").read_text())
    best = max(r["rate"] for r in s["selection"])
    assert next(r for r in s["selection"] if r["candidate"] == s["chosen"])["rate"] == best
    assert [r["candidate"] for r in s["report"]][0] == "as-is" and s["report"][-1]["candidate"] == s["chosen"]
    ids = {k: {json.loads(x)["id"] for x in (out / f"prompts-{k}.jsonl").read_text().splitlines()} for k in ("select", "report")}
    assert len(ids["select"]) == len(ids["report"]) == 2 and not ids["select"] & ids["report"]
    chosen = load_preset(str(out / "best.yaml"))
    assert chosen.name == "no-overrefusal-searched" and chosen.detector == "answer"
