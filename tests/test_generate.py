"""Contrastive generation on the real embedded model, at tiny sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dlma.data import read_jsonl
from dlma.logprobs import score_sequences
from dlma.prompts import Renderer, load_preset

DLMA = [sys.executable, "-m", "dlma.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_pairs_have_both_sides_and_settings(tiny_pairs):
    recs = read_jsonl(tiny_pairs)
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6
    for r in recs:
        assert r["chosen"].strip() and r["rejected"].strip()
        assert r["preset"] == "harmless" and r["generation"]["max_new_tokens"] == 24
        assert r["prompt"][-1]["role"] == "user"


def test_generation_logprobs_match_a_fresh_forward_pass(tiny_pairs, embedded):
    """The raw log-probs recorded while sampling are lp(o+|p+) and lp(o-|p-) of a fresh pass."""
    model, tok = embedded
    r = Renderer(tok, load_preset("harmless"))
    recs = [x for x in read_jsonl(tiny_pairs) if "gen_lp_chosen" in x and "gen_lp_rejected" in x]
    assert len(recs) >= 4, "re-tokenization should give back the sampled ids for most answers"
    ctx = [r.context_ids(x["prompt"], s) for x in recs for s in ("positive", "negative")]
    resp = [r.response_ids(x[k], x[f"{k}_truncated"]) for x in recs for k in ("chosen", "rejected")]
    fresh, _ = score_sequences(model, ctx, resp, pad_id=tok.pad_token_id, batch_size=4)
    recorded = [x[f"gen_lp_{k}"] for x in recs for k in ("chosen", "rejected")]
    assert max(abs(a - b) for a, b in zip(fresh, recorded)) < 1e-2


def _run(args, **kw):
    return subprocess.run(DLMA + args, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def test_killed_run_resumes_without_duplicates(tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = ["generate", "--model", "embedded", "--dtype", "float32", "--prompts", "hh-harmless", "--limit", "8",
            "--max-new-tokens", "12", "--batch-size", "2", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(DLMA + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        assert proc.poll() is None, "generate ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(out.read_text().splitlines())
    assert 3 <= before < 8, "the kill should land halfway"
    done = _run(args)
    assert done.returncode == 0, done.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert json.loads(done.stderr[done.stderr.index("{"):])["already_done"] == before


def test_broken_json_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    res = _run(["generate", "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert f"{bad}:2:" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_unknown_model_says_what_is_available(tmp_path):
    res = _run(["generate", "--model", str(tmp_path / "nowhere"), "--limit", "1", "--out", str(tmp_path / "o.jsonl")])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "embedded" in res.stderr


def test_embedded_model_is_cached_as_float_weights():
    """The second load reads the cached safetensors directory instead of dequantising the GGUF."""
    from dlma.models import embedded_model_dir

    d = embedded_model_dir()
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert embedded_model_dir() == d


def test_each_prompt_source_can_have_its_own_preset(tmp_path, embedded):
    from dlma.config import GenerateConfig, ModelConfig
    from dlma.errors import DlmaError
    from dlma.generate import TransformersBackend, generate_pairs

    model, tok = embedded
    backend = TransformersBackend(model, tok, 4)
    out = tmp_path / "mixed.jsonl"
    cfg = GenerateConfig(prompts="hh-harmless:train,benign-train", preset="harmless,helpful", limit=2, max_new_tokens=6)
    summary = generate_pairs(ModelConfig(dtype="float32"), cfg, str(out), backend=backend, tokenizer=tok, progress=False)
    recs = read_jsonl(out)
    assert summary["pairs_written"] == 4
    assert [r["preset"] for r in recs] == ["harmless", "harmless", "helpful", "helpful"]
    assert recs[2]["label"] == "safe" and recs[2]["prompt_id"].startswith("benign-")
    bad = GenerateConfig(prompts="hh-harmless,benign-train,safety-eval", preset="harmless,helpful", limit=1)
    with pytest.raises(DlmaError, match="2 presets for 3 prompt sources"):
        generate_pairs(ModelConfig(dtype="float32"), bad, str(tmp_path / "x.jsonl"), backend=backend, tokenizer=tok, progress=False)
