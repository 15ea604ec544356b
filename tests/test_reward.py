"""Self-rewarding score: antisymmetry, batch invariance, reuse of generation log-probs, bad input, resume, judges."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from dlma.config import ModelConfig, SamplingConfig, ScoreConfig
from dlma.data import read_pairs
from dlma.errors import DlmaError
from dlma.reward import score_file, score_pairs, summarize_scores


@pytest.fixture(scope="module")
def pairs(tiny_pairs):
    return read_pairs(str(tiny_pairs))[:2]


def test_swap_negates_and_batch_size_invariant(embedded, pairs):
    model, tok = embedded
    a = score_pairs(model, tok, "harmless", pairs, batch_size=16, reference=False, reuse_generation=False)
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"], "chosen_truncated": p["rejected_truncated"],
                "rejected_truncated": p["chosen_truncated"]} for p in pairs]
    b = score_pairs(model, tok, "harmless", swapped, batch_size=1, reference=False, reuse_generation=False)
    for x, y in zip(a, b):
        assert x["self_reward"] != 0
        assert abs(x["self_reward"] + y["self_reward"]) < 1e-2  # also batch 16 vs batch 1
        assert abs(x["lp_chosen_pos"] - y["lp_rejected_pos"]) < 1e-2


def test_generation_logprobs_match_fresh_forward(embedded, pairs):
    """tiny_pairs were sampled in float32: their raw log-probs equal a fresh forward within 1e-2."""
    model, tok = embedded
    assert all("gen_lp_chosen" in p for p in pairs)
    fresh = score_pairs(model, tok, "harmless", pairs, reference=True, reuse_generation=False)
    stats: dict = {}
    reused = score_pairs(model, tok, "harmless", pairs, reference=True, reuse_generation=True, stats=stats)
    assert stats["reused_generation_logprobs"] == len(pairs)
    for f, r, p in zip(fresh, reused, pairs):
        assert abs(f["lp_chosen_pos"] - p["gen_lp_chosen"]) < 1e-2
        assert abs(f["lp_rejected_neg"] - p["gen_lp_rejected"]) < 1e-2
        assert abs(f["self_reward"] - r["self_reward"]) < 2e-2
        assert f["ref_lp_chosen"] < 0 and f["chosen_tokens"] > 0
        assert f["ref_lp_chosen"] != f["lp_chosen_pos"]  # the bare context is a different context


def test_mixed_precision_rechecks_near_ties(embedded, pairs):
    """bf16 body for all pairs; those with |R| under the margin are recomputed exactly."""
    from dlma.reward import MIXED_RECHECK_MARGIN

    model, tok = embedded
    exact = score_pairs(model, tok, "harmless", pairs, reference=False, reuse_generation=False)
    stats: dict = {}
    mixed = score_pairs(model, tok, "harmless", pairs, reference=False, reuse_generation=False, precision="mixed",
                        stats=stats)
    near = 0
    for e, m in zip(exact, mixed):
        if abs(m["self_reward"]) < MIXED_RECHECK_MARGIN:
            near += 1
            assert abs(e["self_reward"] - m["self_reward"]) < 1e-2
        else:
            assert abs(e["self_reward"] - m["self_reward"]) < MIXED_RECHECK_MARGIN and e["self_reward"] * m["self_reward"] > 0
    assert stats["mixed_rechecked"] >= near
    with pytest.raises(DlmaError, match="precision"):
        score_pairs(model, tok, "harmless", pairs, precision="half")


def test_empty_response_and_nan(embedded, pairs):
    model, tok = embedded
    stats: dict = {}
    out = score_pairs(model, tok, "harmless", [{**pairs[0], "rejected": "  "}], reference=False, stats=stats)
    assert out[0]["self_reward"] == 0.0 and stats["empty_responses"] == 1
    bad = {**pairs[0], "id": "bad-one", "gen_lp_chosen": float("nan")}
    with pytest.raises(DlmaError, match="bad-one"):
        score_pairs(model, tok, "harmless", [bad], reference=False)


def test_score_file_resumes(embedded, pairs, tiny_pairs, tmp_path):
    model, tok = embedded
    out = tmp_path / "scored.jsonl"
    cfg = ScoreConfig(limit=1, reference=False)
    first = score_file(ModelConfig(dtype="float32"), cfg, str(tiny_pairs), str(out), model=model, tokenizer=tok, progress=False)
    assert first["scored"] == 1
    with open(out, "a") as f:
        f.write('{"id": "cut-off')  # a kill mid-write
    cfg = ScoreConfig(limit=2, reference=False)
    second = score_file(ModelConfig(dtype="float32"), cfg, str(tiny_pairs), str(out), model=model, tokenizer=tok,
                        progress=False, summary_path=str(tmp_path / "s.json"))
    assert second["already_done"] == 1 and second["scored"] == 1 and second["count"] == 2
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [p["id"] for p in pairs]
    assert json.loads((tmp_path / "s.json").read_text())["count"] == 2


def test_accuracy_on_hh_pairs_both_judges(embedded, tmp_path):
    model, tok = embedded
    s = score_file(ModelConfig(dtype="float32"), ScoreConfig(judge="both", limit=2, reference=False), "hh-harmless",
                   str(tmp_path / "hh.jsonl"), model=model, tokenizer=tok, progress=False)
    assert s["labelled"] == 2
    assert 0.0 <= s["accuracy"] <= 1.0 and 0.0 <= s["accuracy_per_token"] <= 1.0
    j = s["text_judge"]
    assert 0.0 <= j["accuracy"] <= 1.0 and 0.0 <= j["accuracy_calibrated"] <= 1.0
    assert 0.0 < j["answer_token_mass"] <= 1.0 + 1e-6 and 0.0 <= j["position_bias"] <= 1.0
    assert all(abs(x) <= 0.5 for x in (j["judge_score"]["mean"],))


def test_summarize_scores_ties_count_half():
    recs = [{"self_reward": r, "human_label": True, "lp_chosen_pos": r, "lp_chosen_neg": 0.0, "lp_rejected_pos": 0.0,
             "lp_rejected_neg": 0.0, "chosen": "a", "rejected": "b", "chosen_tokens": 2, "rejected_tokens": 1}
            for r in (1.0, -1.0, 0.0, 2.0)]
    s = summarize_scores(recs)
    assert s["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert s["self_reward"]["fraction_positive"] == 0.5
    assert s["self_reward_per_token"]["mean"] == pytest.approx(sum((1.0, -1.0, 0.0, 2.0)) / 2 / 4)
    assert math.isfinite(s["self_reward"]["std"])


def test_one_text_judge_for_rlaif_labels_and_the_reliability_table(embedded, tmp_path):
    """The evaluation's text-judge accuracy is that of the judge that labels RLAIF's pairs:
    the same prompts, the same scores, the same accuracy."""
    from dlma.config import EvalConfig
    from dlma.evaluate import ModelPool, reliability
    from dlma.prompts import load_preset

    model, tok = embedded
    s = score_file(ModelConfig(dtype="float32"), ScoreConfig(judge="text", limit=6, reference=False, preset="harmless"),
                   "hh-harmless", str(tmp_path / "hh.jsonl"), model=model, tokenizer=tok, progress=False)
    rel = reliability(ModelPool(ModelConfig(dtype="float32"), {"embedded": embedded}), "embedded", load_preset("harmless"),
                      EvalConfig(pairs="hh-harmless", pairs_limit=6, batch_size=4), progress=False)
    assert rel["text_judge_accuracy"] == pytest.approx(s["text_judge"]["accuracy"])
    assert rel["text_judge"]["judge_score"]["mean"] == pytest.approx(s["text_judge"]["judge_score"]["mean"], abs=1e-4)
    assert rel["human_labelled"] == 6 and 0 <= rel["self_reward_accuracy"] <= 1


def test_ensemble_is_the_mean_of_r_over_demonstration_sets(embedded, tiny_pairs):
    import dataclasses

    from dlma.prompts import load_preset
    from dlma.reward import ensemble_members, score_ensemble

    model, tok = embedded
    pairs = read_pairs(str(tiny_pairs))[:3]
    preset = load_preset("harmless")
    members = ensemble_members(preset)
    assert len(members) == len(preset.demonstrations) == 3
    singles = [score_pairs(model, tok, m, pairs, reference=False, reuse_generation=False) for m in members]
    ens = score_ensemble(model, tok, preset, pairs, reference=True)
    for i, o in enumerate(ens):
        rs = [run[i]["self_reward"] for run in singles]
        assert o["self_reward_members"] == pytest.approx(rs, abs=1e-3)
        assert o["self_reward"] == pytest.approx(sum(rs) / 3, abs=1e-3)
        assert "ref_lp_chosen" in o and len(set(round(r, 3) for r in rs)) > 1  # the sets do disagree
    with pytest.raises(DlmaError, match="demonstration set"):
        ensemble_members(dataclasses.replace(preset, demonstrations=preset.demonstrations[:1]))


def test_resumed_scoring_is_byte_identical(embedded, tiny_pairs, tmp_path):
    """A kill mid-chunk: the rerun recomputes that chunk whole, so the file equals an uninterrupted one."""
    model, tok = embedded
    base = read_pairs(str(tiny_pairs))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({**base[i % len(base)], "id": f"p{i}"}) + "\n" for i in range(20)))
    cfg = ScoreConfig(batch_size=2, reference=True, reuse_generation=False)  # chunks of 16 pairs
    run = lambda out: score_file(ModelConfig(dtype="float32"), cfg, str(data), str(out), model=model, tokenizer=tok,
                                 progress=False)
    whole = tmp_path / "whole.jsonl"
    run(whole)
    lines = whole.read_bytes().splitlines(keepends=True)
    for kept in (5, 17):  # inside the first chunk, inside the second
        cut = tmp_path / f"cut{kept}.jsonl"
        cut.write_bytes(b"".join(lines[:kept]) + lines[kept][:20])  # the record in flight, half-written
        shutil.copy(f"{whole}.settings.json", f"{cut}.settings.json")
        assert run(cut)["scored"] == 20 - kept
        assert cut.read_bytes() == whole.read_bytes()


def test_generation_logprobs_reused_for_a_preset_given_as_a_file(tmp_path):
    """generate records the preset as it was given (a YAML path for a user's file); scoring under
    the same file reuses the generator's log-probs, under another preset it does not."""
    from dlma.data import pair_digest
    from dlma.prompts import load_preset
    from dlma.reward import _reusable

    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\npositive: bare\nnegative: {instruction: refuse}\n")
    gen = {"dtype": "float32", "max_context": 1024, "max_new_tokens": 32, "model": "embedded"}
    ctx = {"positive": [1] * 10, "negative": [1] * 12}
    rec = {"preset": str(f), "generation": gen, "prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    rec["gen_lp_of"] = pair_digest(rec)
    assert _reusable(rec, load_preset(str(f)), "float32", "embedded", ctx)
    assert _reusable(dict(rec, preset="mine"), load_preset(str(f)), "float32", "embedded", ctx)
    assert not _reusable(rec, load_preset("harmless"), "float32", "embedded", ctx)
    assert not _reusable(dict(rec, generation=dict(gen, dtype="bfloat16")), load_preset(str(f)), "float32", "embedded", ctx)


def test_scoring_precision_auto_is_exact_on_a_cpu_and_mixed_on_a_bf16_gpu(monkeypatch):
    """A GPU cannot run here, so the device checks are stood in for; the choice itself is real."""
    import torch

    import dlma.reward as M  # the device checks as the scorer imported them
    from dlma.config import ModelConfig, ScoreConfig
    from dlma.reward import scoring_precision

    assert ScoreConfig().precision == "auto"
    assert scoring_precision("auto", ModelConfig(device="cpu")) == ("exact", "auto")
    assert scoring_precision("mixed", ModelConfig(dtype="float32")) == ("mixed", "float32")
    monkeypatch.setattr(M, "resolve_device", lambda device="auto": torch.device("cuda", 0))
    monkeypatch.setattr(M, "bf16_supported", lambda device: True)
    assert scoring_precision("auto", ModelConfig()) == ("mixed", "float32")  # float32 weights, bf16 body
    assert scoring_precision("auto", ModelConfig(dtype="bfloat16")) == ("exact", "bfloat16")  # the user's choice
    assert scoring_precision("exact", ModelConfig()) == ("exact", "auto")
    monkeypatch.setattr(M, "bf16_supported", lambda device: False)  # e.g. a V100
    assert scoring_precision("auto", ModelConfig()) == ("exact", "auto")


def test_edited_pairs_and_relative_preset_files(tmp_path, monkeypatch, embedded):
    """Pairs generated under a preset file named relative to where generate ran are scored from
    anywhere (they named a file that was not there); a pair edited after generation has its
    log-probs recomputed (they were reused, the old text's); a pair edited after it was scored into
    --out is refused there (the stale score was kept with exit 0)."""
    from dlma.config import GenerateConfig
    from dlma.data import read_jsonl
    from dlma.errors import DataError
    from dlma.generate import TransformersBackend, generate_pairs

    model, tok = embedded
    made, elsewhere = tmp_path / "made", tmp_path / "elsewhere"
    made.mkdir(), elsewhere.mkdir()
    (made / "mine.yaml").write_text((Path(__file__).parents[1] / "src/dlma/presets/harmless.yaml").read_text())
    monkeypatch.chdir(made)
    generate_pairs(ModelConfig(dtype="float32"), GenerateConfig(prompts="harmful-train", preset="mine.yaml", limit=2,
                                                                batch_size=4),
                   "pairs.jsonl", sampling=SamplingConfig(max_new_tokens=6), backend=TransformersBackend(model, tok, 4), tokenizer=tok, progress=False)
    monkeypatch.chdir(elsewhere)
    data = made / "pairs.jsonl"
    score = lambda src, out: score_file(ModelConfig(dtype="float32"), ScoreConfig(reference=False), str(src), str(out),  # noqa: E731
                                        model=model, tokenizer=tok, progress=False)
    assert score(data, "scored.jsonl")["reused_generation_logprobs"] == 2
    pairs = read_jsonl(data)
    pairs[0]["chosen"] = "I will not help with that."
    edited = elsewhere / "edited.jsonl"
    edited.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    summary = score(edited, "scored-edited.jsonl")
    assert summary["reused_generation_logprobs"] == 1
    fresh = score_pairs(model, tok, str(made / "mine.yaml"), read_pairs(str(edited))[:1], reference=False, reuse_generation=False)
    got = read_jsonl(elsewhere / "scored-edited.jsonl")[0]
    assert got["lp_chosen_pos"] == pytest.approx(fresh[0]["lp_chosen_pos"], abs=1e-3) != pairs[0]["gen_lp_chosen"]
    before = (elsewhere / "scored.jsonl").read_bytes()
    with pytest.raises(DataError, match="scored.jsonl:1: record .* was made from .* as it was before .*edited.jsonl was edited"):
        score(edited, "scored.jsonl")
    assert (elsewhere / "scored.jsonl").read_bytes() == before
