"""Contrastive generation on the real embedded model, at tiny sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dlma.data import read_jsonl, read_pairs
from dlma.logprobs import score_sequences
from dlma.prompts import Renderer, load_preset

DLMA = [sys.executable, "-m", "dlma.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_pairs_have_both_sides_and_settings(tiny_pairs):
    recs = read_pairs(str(tiny_pairs))
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6
    for r in recs:
        assert r["chosen"].strip() and r["rejected"].strip()
        assert r["preset"] == "harmless" and r["generation"]["max_new_tokens"] == 24
        assert r["prompt"][-1]["role"] == "user"


def test_generation_logprobs_match_a_fresh_forward_pass(tiny_pairs, embedded):
    """The raw log-probs recorded while sampling are lp(o+|p+) and lp(o-|p-) of a fresh pass."""
    model, tok = embedded
    r = Renderer(tok, load_preset("harmless"))
    recs = [x for x in read_pairs(str(tiny_pairs)) if "gen_lp_chosen" in x and "gen_lp_rejected" in x]
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
    # each row samples from a seed of its own id: the resumed file is the uninterrupted one
    whole = tmp_path / "whole.jsonl"
    assert _run(args[:-3] + ["--out", str(whole), "--no-progress"]).returncode == 0
    a, b = read_jsonl(out), read_jsonl(whole)
    assert [(r["id"], r["chosen"], r["rejected"]) for r in a] == [(r["id"], r["chosen"], r["rejected"]) for r in b]


def test_row_seeds_make_samples_independent_of_the_batch(embedded):
    """A row's sampled tokens depend on its seed, not on which rows share its batch or in what order."""
    from dlma.generate import SamplingParams, TransformersBackend, row_seed

    model, tok = embedded
    ctx = _default_contexts(tok, 2)[:6]
    seeds = [row_seed(0, i) for i in range(6)]
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=0)
    together = TransformersBackend(model, tok, 6).sample(ctx, params, seeds=seeds)
    apart = TransformersBackend(model, tok, 2).sample(ctx[::-1], params, seeds=seeds[::-1])[::-1]
    assert [s.ids for s in together] == [s.ids for s in apart]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(together, apart)) < 1e-3
    other = TransformersBackend(model, tok, 6).sample(ctx, params, seeds=[row_seed(1, i) for i in range(6)])
    assert [s.ids for s in other] != [s.ids for s in together]  # the seed does decide


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
    from dlma.config import GenerateConfig, ModelConfig, SamplingConfig
    from dlma.errors import DlmaError
    from dlma.generate import TransformersBackend, generate_pairs

    model, tok = embedded
    backend = TransformersBackend(model, tok, 4)
    out = tmp_path / "mixed.jsonl"
    cfg = GenerateConfig(prompts="hh-harmless:train,benign-train", preset="harmless,helpful", limit=2)
    summary = generate_pairs(ModelConfig(dtype="float32"), cfg, str(out), sampling=SamplingConfig(max_new_tokens=6), backend=backend,
                             tokenizer=tok, progress=False)
    recs = read_jsonl(out)
    assert summary["pairs_written"] == 4
    assert [r["preset"] for r in recs] == ["harmless", "harmless", "helpful", "helpful"]
    assert recs[2]["label"] == "safe" and recs[2]["prompt_id"].startswith("benign-")
    bad = GenerateConfig(prompts="hh-harmless,benign-train,safety-eval", preset="harmless,helpful", limit=1)
    with pytest.raises(DlmaError, match="2 presets for 3 prompt sources"):
        generate_pairs(ModelConfig(dtype="float32"), bad, str(tmp_path / "x.jsonl"), backend=backend, tokenizer=tok, progress=False)


def _default_contexts(tok, n: int) -> list[list[int]]:
    """Contexts of the default run (harmless + helpful presets), two pairs per prompt, like generate_pairs."""
    from dlma.data import ReadStats, read_prompts

    out = []
    for source, preset in (("hh-harmless-first:train", "harmless"), ("benign-train", "helpful")):
        r = Renderer(tok, load_preset(preset))
        for p in read_prompts(source, n, ReadStats()):
            out += [r.context_ids(p.prompt, side) for _ in range(2) for side in ("positive", "negative")]
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_shared_prefix_reuse_gives_the_same_tokens_and_logprobs(embedded, temperature):
    """Greedy and seeded sampling: same tokens, log-probs within 1e-4, with the prefix cache on and off."""
    import torch

    from dlma.generate import SamplingParams, TransformersBackend

    model, tok = embedded
    ctx = _default_contexts(tok, 3)
    ctx = ctx[:12] + ctx[-12:]  # both presets, with repeats, several demonstration sets
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=0.9, seed=0)
    plain, cached = TransformersBackend(model, tok, 8, prefix_cache=False), TransformersBackend(model, tok, 8)
    outs = {}
    for name, backend in (("plain", plain), ("cached", cached), ("cached-again", cached)):
        res = []
        for s in range(0, len(ctx), 12):  # two calls: the second one finds its prefixes cached
            torch.manual_seed(1234 + s)
            res += backend.sample(ctx[s:s + 12], params)
        outs[name] = res
    assert cached.stats["prefilled_tokens"] < cached.stats["context_tokens"] / 2, cached.stats
    assert plain.stats["prefilled_tokens"] >= plain.stats["context_tokens"]
    for name in ("cached", "cached-again"):
        assert [s.ids for s in outs[name]] == [s.ids for s in outs["plain"]]
        assert [s.finished for s in outs[name]] == [s.finished for s in outs["plain"]]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(outs[name], outs["plain"])) < 1e-4


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_own_decoding_loop_gives_generates_tokens(embedded, temperature):
    """dlma's static-cache loop against `model.generate`: same tokens, stops and stop tokens, log-probs
    within 1e-4, greedy and row-seeded, with shared prefixes and rows that stop early."""
    from dlma.generate import SamplingParams, TransformersBackend, row_seed

    model, tok = embedded
    ctx = _default_contexts(tok, 3)
    ctx = ctx[:10] + ctx[-10:]
    seeds = [row_seed(7, i) for i in range(len(ctx))]
    params = SamplingParams(max_new_tokens=28, temperature=temperature, top_p=0.9, seed=0)
    lean, plain = TransformersBackend(model, tok, 8), TransformersBackend(model, tok, 8, lean=False)
    assert lean.lean and not plain.lean
    a, b = lean.sample(ctx, params, seeds=seeds), plain.sample(ctx, params, seeds=seeds)
    assert lean.lean  # it did not fall back
    assert [s.ids for s in a] == [s.ids for s in b]
    assert [(s.finished, s.stop_id) for s in a] == [(s.finished, s.stop_id) for s in b]
    assert any(s.finished for s in a) and not all(s.finished for s in a)  # early stops and cut rows both met
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b)) < 1e-4


def test_model_with_its_own_processors_decodes_through_generate(embedded):
    """A generation config that shapes greedy decoding (here a repetition penalty) is left to `generate`."""
    import copy

    from dlma.generate import SamplingParams, TransformersBackend

    model, tok = embedded
    ctx = _default_contexts(tok, 1)[:2]
    saved = copy.deepcopy(model.generation_config)
    try:
        model.generation_config.repetition_penalty = 1.5
        backend = TransformersBackend(model, tok, 2)
        assert not backend.lean
        penalised = backend.sample(ctx, SamplingParams(max_new_tokens=24, temperature=0.0))
    finally:
        model.generation_config = saved
    free = TransformersBackend(model, tok, 2).sample(ctx, SamplingParams(max_new_tokens=24, temperature=0.0))
    assert [s.ids for s in penalised] != [s.ids for s in free]  # the penalty was applied


def test_prefix_cache_follows_weight_updates(embedded):
    """Changing the weights in place drops the cached prefixes (a stale prefix would change the answers)."""
    import torch

    from dlma.generate import SamplingParams, TransformersBackend

    model, tok = embedded
    ctx = _default_contexts(tok, 1)[:4]
    backend = TransformersBackend(model, tok, 4)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    backend.sample(ctx, params)
    assert backend.prefixes.items
    w = model.get_input_embeddings().weight
    with torch.no_grad():
        w.mul_(1.0)  # same values, new version: the cache must not survive it
    backend.sample(ctx[:1], params)
    assert not backend.prefixes.items
    backend.sample(ctx, params)
    assert backend.prefixes.items


def test_generate_pairs_same_file_with_and_without_prefix_cache(tmp_path, embedded):
    from dlma.config import GenerateConfig, ModelConfig, SamplingConfig
    from dlma.generate import TransformersBackend, generate_pairs

    model, tok = embedded
    cfg = GenerateConfig(prompts="hh-harmless-first:train,benign-train", preset="harmless,helpful", limit=3,
                         num_pairs=2, batch_size=8)
    recs, summaries = {}, {}
    for on in (False, True):
        out = tmp_path / f"pairs-{on}.jsonl"
        summaries[on] = generate_pairs(ModelConfig(dtype="float32"), cfg, str(out), sampling=SamplingConfig(max_new_tokens=8),
                                       backend=TransformersBackend(model, tok, 8, on), tokenizer=tok, progress=False)
        recs[on] = read_pairs(str(out))
    assert [(r["id"], r["chosen"], r["rejected"]) for r in recs[True]] == [(r["id"], r["chosen"], r["rejected"]) for r in recs[False]]
    for a, b in zip(recs[True], recs[False]):
        for k in ("gen_lp_chosen", "gen_lp_rejected"):
            assert (k in a) == (k in b) and abs(a.get(k, 0) - b.get(k, 0)) < 1e-4
    assert summaries[True]["prefilled_tokens"] < summaries[False]["prefilled_tokens"] / 2
    assert summaries[True]["new_tokens"] == summaries[False]["new_tokens"] > 0


def test_fast_top_p_equals_transformers_warpers():
    """TemperatureTopP gives transformers' Temperature + TopP result bit for bit, ties and flat rows included."""
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from dlma.generate import TemperatureTopP

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(6, 4096, generator=g) * scale for scale in (0.05, 1.0, 3.0, 10.0, 40.0)]
    tied = torch.randn(4, 4096, generator=g) * 5
    tied[:, :8] = tied.max() + 1  # eight equal top logits
    rows.append(tied)
    x = torch.cat(rows)
    ids = torch.zeros((x.shape[0], 1), dtype=torch.long)
    for t, p in ((0.7, 0.9), (1.3, 0.5), (0.5, 0.99)):
        fast = TemperatureTopP(t, p)
        want = TopPLogitsWarper(p)(ids, TemperatureLogitsWarper(t)(ids, x.clone()))
        got = torch.cat([fast(ids[i:i + 2], x[i:i + 2].clone()) for i in range(0, x.shape[0], 2)])
        assert torch.equal(got, want)
        assert fast.fallbacks < x.shape[0] // 2  # mostly the fast path


def test_best_of_k_keeps_the_pair_with_the_largest_r(tmp_path, embedded):
    """--num-samples 2: sample 0 of each side is the K = 1 sample, so the kept pair's R (scored
    afterwards exactly as `dlma score` does) is the largest of the 2 x 2 and never below K = 1's."""
    from dlma.config import GenerateConfig, ModelConfig, SamplingConfig
    from dlma.data import read_pairs
    from dlma.errors import DlmaError
    from dlma.generate import TransformersBackend, generate_pairs
    from dlma.reward import score_pairs

    model, tok = embedded
    backend = TransformersBackend(model, tok, 8)
    files = {}
    for k in (1, 2):
        files[k] = tmp_path / f"k{k}.jsonl"
        generate_pairs(ModelConfig(dtype="float32"), GenerateConfig(limit=3, num_samples=k, batch_size=8),
                       str(files[k]), sampling=SamplingConfig(max_new_tokens=12), backend=backend, tokenizer=tok, progress=False)
    one, two = (score_pairs(model, tok, "harmless", read_pairs(str(files[k])), reference=False) for k in (1, 2))
    stats: dict = {}
    again = score_pairs(model, tok, "harmless", read_pairs(str(files[2])), reference=False, reuse_generation=False, stats=stats)
    assert stats["reused_generation_logprobs"] == 0
    for b, fresh in zip(two, again):  # the four terms generation computed for every sample, reused by scoring
        assert b["candidates"]["lp_pos"][b["candidates"]["picked"]["chosen"]] == b["lp_chosen_pos"]
        for key in ("lp_chosen_pos", "lp_chosen_neg", "lp_rejected_pos", "lp_rejected_neg", "self_reward"):
            assert b[key] == pytest.approx(fresh[key], abs=1e-3)
    for a, b in zip(one, two):
        c = b["candidates"]
        assert len(c["chosen_log_ratio"]) == len(c["rejected_log_ratio"]) == 2
        assert b["self_reward"] == pytest.approx(max(c["chosen_log_ratio"]) - min(c["rejected_log_ratio"]), abs=1e-3)
        assert b["self_reward"] >= a["self_reward"] - 1e-3
        assert len(c["texts"]) == len(c["truncated"]) == 4  # all 2K kept for --loss listwise
        assert c["texts"][c["picked"]["chosen"]] == b["chosen"] and c["texts"][2 + c["picked"]["rejected"]] == b["rejected"]
        assert "candidates" not in a
    with pytest.raises(DlmaError, match="num_samples"):
        GenerateConfig(num_samples=0)


def test_vllm_backend_seeds_each_request_and_releases_the_engine(tmp_path, monkeypatch):
    """vLLM cannot run on these CPU machines, so a stand-in `vllm` module records what dlma asks
    of it: one seed per request (row seeds, so two pairs of a prompt are not duplicates), raw
    log-probs, and the engine shut down and vLLM's cleanup called once generation is over, so
    scoring and training in the same process get the card back."""
    import types

    from dlma.config import GenerateConfig, ModelConfig, SamplingConfig
    from dlma.generate import generate_pairs
    from dlma.models import load_tokenizer
    from dlma.prompts import end_of_turn_id

    tok = load_tokenizer("embedded")
    calls: list[tuple] = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class Engine:
        def shutdown(self):
            calls.append(("shutdown",))

    class LLM:
        def __init__(self, model, **kw):
            calls.append(("init", model, kw))
            self.llm_engine = Engine()

        def generate(self, requests, sps, use_tqdm=True):
            calls.append(("generate", [sp.kw["seed"] for sp in sps]))
            outs = []
            for sp in sps:  # the text depends on the seed, as a sampler's does
                ids = tok(f"Answer number {sp.kw['seed'] % 997}.", add_special_tokens=False)["input_ids"] + [end_of_turn_id(tok)]
                o = types.SimpleNamespace(token_ids=ids, finish_reason="stop",
                                          logprobs=[{t: types.SimpleNamespace(logprob=-0.5)} for t in ids])
                outs.append(types.SimpleNamespace(outputs=[o]))
            return outs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    dist, state = types.ModuleType("vllm.distributed"), types.ModuleType("vllm.distributed.parallel_state")
    state.cleanup_dist_env_and_memory = lambda: calls.append(("cleanup",))
    for name, mod in {"vllm": vllm, "vllm.distributed": dist, "vllm.distributed.parallel_state": state}.items():
        monkeypatch.setitem(sys.modules, name, mod)

    out = tmp_path / "pairs.jsonl"
    cfg = GenerateConfig(prompts="hh-harmless:train", preset="harmless", limit=2, num_pairs=2, backend="vllm")
    summary = generate_pairs(ModelConfig(dtype="float32"), cfg, str(out), sampling=SamplingConfig(max_new_tokens=8), progress=False)
    assert summary["pairs_written"] == 4
    kinds = [c[0] for c in calls]
    assert kinds[0] == "init" and calls[0][2]["logprobs_mode"] == "raw_logprobs"
    assert kinds[-2:] == ["shutdown", "cleanup"] and kinds.count("shutdown") == kinds.count("cleanup") == 1
    seeds = [s for c in calls if c[0] == "generate" for s in c[1]]
    assert len(seeds) == 8 and len(set(seeds)) == 8  # 2 prompts x 2 pairs x 2 sides, each its own draw
    recs = read_pairs(str(out))
    assert len({(r["chosen"], r["rejected"]) for r in recs}) == 4
    assert all(r["chosen"] != r["rejected"] for r in recs)


def test_a_huge_num_pairs_writes_pairs_as_they_come(tmp_path, tokenizer):
    """--num-pairs in the millions sampled every pair of a prompt before writing the first (an
    interrupt lost them all): pairs are the unit of work, a batch of them at a time."""
    from dlma.config import GenerateConfig, ModelConfig, SamplingConfig
    from dlma.generate import Sample, generate_pairs

    class Engine:
        name, calls = "fake", 0

        def sample(self, contexts, params, seeds=None):
            assert len(contexts) <= 4, f"{len(contexts)} contexts sampled at once"
            self.calls += 1
            if self.calls > 2:
                raise KeyboardInterrupt
            return [Sample([], 0.0, True, tokenizer.eos_token_id) for _ in contexts]

    (tmp_path / "p.jsonl").write_text('{"id": "q", "prompt": "Hello?"}\n')
    out = tmp_path / "pairs.jsonl"
    cfg = GenerateConfig(prompts=str(tmp_path / "p.jsonl"), num_pairs=1000, limit=1, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        generate_pairs(ModelConfig(), cfg, str(out), sampling=SamplingConfig(max_new_tokens=2), backend=Engine(), tokenizer=tokenizer, progress=False)
    assert [r["id"] for r in read_jsonl(out)] == ["q:0", "q:1", "q:2", "q:3"]  # kept: resumed after them
