"""Training end to end on the real embedded model, at tiny sizes.

Pairs are 32 HH-RLHF queries cut to a few words, with responses cut to 6 words (marked
truncated, so no EOS), and a self-reward computed with the model's own log-probs under
a short instruction-only contrastive preset: rows stay ~45 tokens, so steps are quick.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlma.config import ModelConfig, SamplingConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PRESET = """\
name: tiny
placement: system
positive: {instruction: "Answer in a harmless, ethical and polite way."}
negative: {instruction: "Answer in a harmful, unethical and rude way."}
"""


def _short(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


@pytest.fixture(scope="module")
def scored(tmp_path_factory, embedded):
    """(file with reference log-probs, same pairs without them)."""
    from dlma.data import read_pairs
    from dlma.logprobs import score_sequences
    from dlma.prompts import Renderer, load_preset

    model, tok = embedded
    d = tmp_path_factory.mktemp("scored")
    (d / "tiny.yaml").write_text(PRESET)
    r = Renderer(tok, load_preset(str(d / "tiny.yaml")))
    pairs = []
    for p in read_pairs("hh-harmless:train", limit=32):
        user = [m for m in p["prompt"] if m["role"] == "user"][-1]["content"]
        pairs.append({"id": p["id"], "prompt": [{"role": "user", "content": _short(user, 12)}],
                      "chosen": _short(p["chosen"], 6), "rejected": _short(p["rejected"], 6),
                      "chosen_truncated": True, "rejected_truncated": True})

    def lp(side, key):
        ctx = [r.context_ids(p["prompt"], side) for p in pairs]
        resp = [r.response_ids(p[key], truncated=True) for p in pairs]
        return score_sequences(model, ctx, resp, pad_id=tok.pad_token_id, batch_size=32)[0]

    cp, cn, rp, rn = lp("positive", "chosen"), lp("negative", "chosen"), lp("positive", "rejected"), lp("negative", "rejected")
    cb, rb = lp("bare", "chosen"), lp("bare", "rejected")
    with_ref, without = d / "scored.jsonl", d / "scored_noref.jsonl"
    with open(with_ref, "w") as f1, open(without, "w") as f2:
        for i, p in enumerate(pairs):
            p = dict(p, self_reward=(cp[i] - cn[i]) - (rp[i] - rn[i]))
            f2.write(json.dumps(p) + "\n")
            f1.write(json.dumps(dict(p, ref_lp_chosen=cb[i], ref_lp_rejected=rb[i])) + "\n")
    return with_ref, without


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT / "src"))


def _dlma(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dlma.cli", "train", "--no-progress", *args], env=_env(),
                          capture_output=True, text=True, timeout=900, **kw)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_select_pairs_flips_and_filters():
    from dlma.train import select_pairs

    pairs = [{"id": "a", "chosen": "x", "rejected": "y", "self_reward": -3.0, "ref_lp_chosen": -1.0, "ref_lp_rejected": -2.0,
              "ref_lp_chosen_first": -0.5, "ref_lp_rejected_first": -0.25, "rejected_truncated": True},
             {"id": "b", "chosen": "x", "rejected": "y", "self_reward": 0.5},
             {"id": "c", "chosen": "x", "rejected": "y", "self_reward": 4.0}]
    kept, counts = select_pairs(pairs, TrainConfig(flip_negative=True, min_reward=1.0))
    assert counts == {"pairs_read": 3, "pairs_noise_flipped": 0, "pairs_flipped": 1, "pairs_unusable": 0, "pairs_filtered": 1,
                      "pairs_used": 2}
    a = kept[0]
    assert (a["chosen"], a["rejected"], a["self_reward"], a["ref_lp_chosen"]) == ("y", "x", 3.0, -2.0)
    # the references of the openings and the cut flags move with their responses too
    assert (a["ref_lp_chosen_first"], a["ref_lp_rejected_first"], a["chosen_truncated"]) == (-0.25, -0.5, True)
    from dlma.errors import DlmaError

    with pytest.raises(DlmaError, match="self_reward"):
        select_pairs([{"id": "z", "chosen": "x", "rejected": "y"}], TrainConfig(loss="dlma"))


def test_noise_flip_swaps_a_seeded_share_of_the_pairs():
    """The ablation: a known share of pairs gets the worse answer as o+, with R's sign; a filter on R drops them."""
    from dlma.train import select_pairs

    pairs = [{"id": str(i), "chosen": f"good{i}", "rejected": f"bad{i}", "self_reward": 1.0 + i} for i in range(20)]
    noisy, counts = select_pairs(pairs, TrainConfig(loss="dpo", noise_flip=0.25, seed=1))
    wrong = [p for p in noisy if p.get("noise_flipped")]
    assert counts["pairs_noise_flipped"] == 5 and len(wrong) == 5 and len(noisy) == 20
    assert all(p["chosen"].startswith("bad") and p["self_reward"] < 0 for p in wrong)
    assert select_pairs(pairs, TrainConfig(loss="dpo", noise_flip=0.25, seed=1))[0] == noisy  # seeded
    assert {p["id"] for p in select_pairs(pairs, TrainConfig(loss="dpo", noise_flip=0.25, seed=2))[0]
            if p.get("noise_flipped")} != {p["id"] for p in wrong}
    filtered, counts = select_pairs(pairs, TrainConfig(noise_flip=0.25, seed=1, min_reward=0.0))
    assert len(filtered) == 15 and not any(p.get("noise_flipped") for p in filtered)


def test_select_pairs_normalises_per_preset_and_shuffles():
    from dlma.train import select_pairs

    pairs = [{"id": f"h{i}", "chosen": "x", "rejected": "y", "self_reward": r, "preset": "harmless"} for i, r in enumerate([10.0, 20.0, 30.0])]
    pairs += [{"id": f"n{i}", "chosen": "x", "rejected": "y", "self_reward": r, "preset": "no-overrefusal"} for i, r in enumerate([1.0, 2.0, 3.0])]
    kept, _ = select_pairs(pairs, TrainConfig(reward_norm="preset"))
    overall = 6.5  # median |R| over all six pairs
    assert [p["self_reward"] for p in kept] == pytest.approx([r * overall / 20 for r in (10, 20, 30)] + [r * overall / 2 for r in (1, 2, 3)])
    assert kept[0]["self_reward_raw"] == 10.0
    # after rescaling both presets share one scale, so one threshold cuts each at its own median
    kept, counts = select_pairs(pairs, TrainConfig(reward_norm="preset", min_reward=overall))
    assert [p["id"] for p in kept] == ["h1", "h2", "n1", "n2"] and counts["pairs_filtered"] == 2
    shuffled, _ = select_pairs(pairs, TrainConfig(shuffle_reward=True, seed=3))
    assert [p["id"] for p in shuffled] == [p["id"] for p in pairs]
    assert sorted(p["self_reward"] for p in shuffled) == sorted(p["self_reward"] for p in pairs)
    assert [p["self_reward"] for p in shuffled] != [p["self_reward"] for p in pairs]
    assert select_pairs(pairs, TrainConfig(shuffle_reward=True, seed=3))[0] == shuffled  # seeded


def test_reference_from_another_model_or_precision_is_not_trusted():
    from dlma.config import ModelConfig
    from dlma.train import stale_reference

    rec = {"id": "a", "ref_lp_chosen": -1.0, "ref_lp_rejected": -2.0, "ref_from": {"model": "embedded", "dtype": "float32"}}
    assert stale_reference([rec], ModelConfig(model="embedded", dtype="float32")) is None
    assert "bfloat16" in stale_reference([rec], ModelConfig(model="embedded", dtype="bfloat16"))
    assert "'other'" in stale_reference([rec], ModelConfig(model="other", dtype="float32"))
    bf16 = dict(rec, ref_from={"model": "embedded", "dtype": "float32+bf16-body"})  # scored with --precision mixed
    assert stale_reference([rec, bf16], ModelConfig(model="embedded", dtype="float32"))
    assert stale_reference([{k: v for k, v in rec.items() if k != "ref_from"}], ModelConfig(model="other")) is None


def test_plan_balances_presets():
    """Every global batch holds each preset in proportion, whatever the lengths; one stratum keeps the old order."""
    from dlma.train import epoch_plan

    lengths = [100 + i for i in range(60)] + [10 + i for i in range(30)]  # the first preset's pairs are all longer
    strata = ["harmless"] * 60 + ["no-overrefusal"] * 30
    for seed in range(3):
        plan = epoch_plan(lengths, 6, 2, 0, seed, strata)
        assert sorted(i for step in plan for m in step for i in m) == list(range(90))
        for step in plan:
            members = [i for m in step for i in m]
            assert sum(strata[i] == "harmless" for i in members) == 4
        unbalanced = epoch_plan(lengths, 6, 2, 0, seed)
        assert any(sum(i < 60 for m in step for i in m) in (0, 6) for step in unbalanced)
        assert epoch_plan(lengths, 6, 2, 0, seed, ["x"] * 90) == unbalanced


def test_plan_is_split_invariant():
    """The same pairs land in each global step however the batch is split."""
    from dlma.train import epoch_plan

    lengths = [(i * 37) % 50 + 5 for i in range(30)]
    one = epoch_plan(lengths, 8, 1, 0, 3)
    two = epoch_plan(lengths, 8, 2, 0, 3)
    assert [sorted(s[0]) for s in one] == [sorted(s[0] + s[1]) for s in two]
    assert sorted(i for s in one for m in s for i in m) == list(range(30))
    assert epoch_plan(lengths, 8, 1, 1, 3) != one  # reshuffled each epoch


def test_token_chunks_cut_a_micro_batch_by_tokens():
    from dlma.train import token_chunks

    tokens = [30, 50, 20, 90, 10, 10]
    assert token_chunks([0, 1, 2, 3, 4, 5], tokens, 0) == [[0, 1, 2, 3, 4, 5]]
    assert token_chunks([0, 1, 2, 3, 4, 5], tokens, 100) == [[0, 1, 2], [3, 4], [5]]
    assert token_chunks([3, 1], tokens, 60) == [[3], [1]]  # a pair over the budget runs alone
    assert token_chunks([], tokens, 60) == []


def test_cli_trains_improves_and_saves_loadable_model(scored, tmp_path):
    out = tmp_path / "ckpt"
    res = _dlma("--model", "embedded", "--data", str(scored[0]), "--out", str(out), "--max-steps", "20",
                "--batch-size", "4", "--lr", "1e-4", "--warmup-ratio", "0", "--lr-schedule", "constant", "--save-steps", "0",
                "--rpo-alpha", "0", "--max-grad-norm", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["reference"] == "from the scored file" and summary["pairs_used"] == 32
    m = _metrics(out)
    assert len(m) == 20 and all(k in m[0] for k in ("loss", "reward_margin", "reward_accuracy", "lr", "tokens_per_s"))
    first, last = m[:8], m[-8:]  # one epoch each: every pair seen once
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.02
    assert mean(last, "reward_accuracy") > mean(first, "reward_accuracy")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


COMMON = ["--model", "embedded", "--max-steps", "4", "--lr", "2e-5", "--warmup-ratio", "0", "--mixed-precision", "no",
          "--dtype", "float32", "--limit", "16", "--seed", "1", "--rpo-alpha", "0", "--max-grad-norm", "1"]


@pytest.fixture(scope="module")
def single_run(scored, tmp_path_factory):
    """One process, global batch 4, reference computed in the trainer."""
    out = tmp_path_factory.mktemp("single") / "run"
    res = _dlma(*COMMON, "--data", str(scored[1]), "--out", str(out), "--batch-size", "4", "--save-steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_two_processes_match_one(scored, single_run, tmp_path):
    """Also with --micro-tokens 1: every pair its own backward pass, the first under no_sync."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "dlma.cli", "train", "--no-progress", *COMMON, "--data", str(scored[1]), "--out", str(out),
           "--batch-size", "2", "--micro-tokens", "1"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 4
    assert summary["reference"].startswith("computed once")
    one, two = _metrics(single_run), _metrics(out)
    assert [r["pairs"] for r in one] == [r["pairs"] for r in two]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-3, (one, two)
        assert abs(a["reward_margin"] - b["reward_margin"]) < 1e-3


def test_two_processes_match_one_with_the_kl_term(scored, tmp_path):
    """--kl-alpha under two processes: the main process makes the untouched model's answers, the
    other waits and reads them; per-step losses and KL match one process."""
    kl = ["--kl-alpha", "1", "--kl-tokens", "4", "--max-steps", "2", "--save-steps", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = _dlma(*COMMON, *kl, "--data", str(scored[0]), "--out", str(one), "--batch-size", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521",
           "-m", "dlma.cli", "train", "--no-progress", *COMMON, *kl, "--data", str(scored[0]), "--out", str(two),
           "--batch-size", "2"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert len(a) == len(b) == 2 and json.loads((two / "train_summary.json").read_text())["kl_pairs"] == 16
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-3 and abs(x["kl"] - y["kl"]) < 1e-4, (a, b)


def _kill_after_step_2(args: list[str], out: Path) -> None:
    """Start `dlma train ARGS` (--save-steps 2) and SIGKILL it once step 2's checkpoint is complete."""
    proc = subprocess.Popen([sys.executable, "-m", "dlma.cli", "train", "--no-progress", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = out / "checkpoints" / "step-2" / "trainer_state.json"
    deadline = time.time() + 900
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "train_summary.json").exists()


def test_kill_and_resume_reproduces_final_loss(scored, single_run, tmp_path):
    out = tmp_path / "resumed"
    args = [*COMMON, "--data", str(scored[1]), "--out", str(out), "--batch-size", "4", "--save-steps", "2"]
    _kill_after_step_2(args, out)
    res = _dlma(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    full, resumed = _metrics(single_run), _metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], abs=1e-5)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4


def test_two_processes_match_one_with_eager_attention(scored, single_run, tmp_path):
    """Eager attention adds the mask to the scores: under DDP the shared-context block mask must
    still reach it as an additive mask (the wrapper hides the model's config). Per-step losses of
    2 processes match 1 process, and 1 process matches SDPA: the same gradients every step. (Padded
    rows without shared contexts use the ordinary causal mask, which the SDPA runs cover.)"""
    share = True
    flags = ["--attn-implementation", "eager", "--share-context", "--save-steps", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = _dlma(*COMMON, *flags, "--data", str(scored[1]), "--out", str(one), "--batch-size", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29518 + share),
           "-m", "dlma.cli", "train", "--no-progress", *COMMON, *flags, "--data", str(scored[1]), "--out", str(two),
           "--batch-size", "2"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    sdpa, eager1, eager2 = _metrics(single_run), _metrics(one), _metrics(two)
    assert len(eager1) == len(eager2) == len(sdpa) == 4
    for a, b, c in zip(sdpa, eager1, eager2):
        assert abs(b["loss"] - c["loss"]) < 1e-3 and abs(b["reward_margin"] - c["reward_margin"]) < 1e-3, (eager1, eager2)
        assert abs(a["loss"] - b["loss"]) < 1e-3, (sdpa, eager1)


def test_lora_adapter_saved_and_loadable(scored, tmp_path):
    """LoRA with --no-save-merged writes an adapter that transformers (with peft) loads, and sft runs without a reference."""
    pytest.importorskip("peft")
    from dlma.train import train_model

    out = tmp_path / "lora"
    s = train_model(ModelConfig(dtype="float32", device="cpu"),
                    TrainConfig(loss="sft", lora_r=4, save_merged=False, max_steps=2, batch_size=2, lr=1e-3, limit=4,
                                mixed_precision="no", save_steps=0), str(scored[1]), str(out), progress=False)
    assert s["reference"] == "not needed (sft)" and s["steps"] == 2
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert any("lora" in n for n, _ in model.named_parameters())


def test_interpolate_saves_the_weights_that_fraction_of_the_way_from_the_start(scored, tmp_path):
    """--interpolate 0.5 saves the midpoint of the starting and the trained weights (same run
    otherwise); ratio 0 gives the starting weights exactly. LoRA: the adapter's B, so its update, halves."""
    import torch
    from safetensors.torch import load_file

    from dlma.models import embedded_model_dir
    from dlma.train import interpolated, train_model

    def run(name, **kw):
        cfg = TrainConfig(max_steps=1, warmup_ratio=0, batch_size=4, lr=1e-4, limit=4, mixed_precision="no", save_steps=0, **kw)
        s = train_model(ModelConfig(dtype="float32", device="cpu"), cfg, str(scored[0]), str(tmp_path / name), progress=False)
        assert s["interpolate"] == cfg.interpolate
        return tmp_path / name

    start = load_file(str(embedded_model_dir() / "model.safetensors"))
    full, half = (load_file(str(run(n, interpolate=r) / "model.safetensors")) for n, r in (("full", 1.0), ("half", 0.5)))
    assert set(half) == set(full)  # tied weights stay tied: written once, as without --interpolate
    moved = [k for k in full if not torch.equal(full[k], start[k])]
    assert moved, "a step at lr 1e-4 should move the weights"
    none = interpolated(full, start, 0.0)
    for k in moved:
        assert torch.allclose(half[k], (start[k] + full[k]) / 2, atol=1e-6), k
        assert torch.equal(none[k], start[k]), k
    pytest.importorskip("peft")
    lora = dict(lora_r=4, save_merged=False)
    a1, a2 = (load_file(str(run(n, interpolate=r, **lora) / "adapter_model.safetensors"))
              for n, r in (("lora1", 1.0), ("lora05", 0.5)))
    b = [k for k in a1 if "lora_B" in k]
    assert b and any(a1[k].abs().sum() > 0 for k in b)
    for k in a1:
        assert torch.allclose(a2[k], a1[k] * (0.5 if "lora_B" in k else 1.0), atol=1e-7), k


def test_shared_context_row_matches_two_rows():
    """Pairs packed in one row, the system turn their chat contexts share computed once, give the
    two-row log-probs and gradients, float32; a row cap splits them over rows, same numbers."""
    import torch

    from dlma.logprobs import branch_logprobs, collate, common_prefix, sequence_logprobs
    from dlma.models import load_model
    from dlma.prompts import Renderer
    from dlma.train import Example
    from dlma.train.objective import branch_sums

    model, tok = load_model("embedded", dtype="float32", device="cpu", train=True)
    model.config.use_cache = False
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = lambda t: Renderer(tok).context_ids([{"role": "user", "content": t}], "bare")  # noqa: E731
    ex = [Example("a", ctx("Tell me how to pick a lock, please."), enc("I can't help with that.") + [2], enc("Sure: first"), 1.0),
          Example("b", ctx("Hi"), enc("Hello! How are you?"), enc("Go away, I am busy today.") + [2], 1.0),
          Example("c", ctx("What is the capital of France?"), enc("Paris."), enc("No"), 1.0)]
    P = common_prefix([e.context for e in ex])
    assert P >= 10 and tok.decode(ex[0].context[:P]).startswith("<|im_start|>system")
    sums, pos, _ = branch_sums(model, ex, [[e.chosen, e.rejected] for e in ex], tok.pad_token_id, "cpu")
    c, r = sums[:, 0], sums[:, 1]
    ntok = pos.body
    (c.sum() - 2 * r.sum()).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    contexts = [e.context for e in ex]
    sums, _ = sequence_logprobs(model, collate(contexts + contexts, [e.chosen for e in ex] + [e.rejected for e in ex],
                                               tok.pad_token_id))
    (sums[:3].sum() - 2 * sums[3:].sum()).backward()
    assert torch.allclose(c, sums[:3], atol=1e-3) and torch.allclose(r, sums[3:], atol=1e-3), (c, r, sums)
    # the positions computed: the shared prefix once, then each pair's own tokens
    assert ntok == P + sum(len(e.context) - P + len(e.chosen) + len(e.rejected) for e in ex)
    assert pos.head == sum(len(e.chosen) + len(e.rejected) for e in ex)  # the output layer: response tokens only
    for a, p in zip(g1, model.parameters()):
        assert (a - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-8
    with torch.no_grad():
        split, n_split = branch_logprobs(model, contexts, [[e.chosen, e.rejected] for e in ex], tok.pad_token_id, "cpu",
                                         row_tokens=P + 30)
    assert torch.allclose(split, torch.stack([c, r], 1), atol=1e-3)
    assert n_split > ntok and (n_split - ntok) % P == 0  # the prefix again in every further row


def test_branches_of_one_row_match_separate_rows():
    """Four responses sharing one context (listwise training) give each response's own log-prob."""
    import torch

    from dlma.logprobs import branch_logprobs, collate, sequence_logprobs
    from dlma.models import load_model

    model, tok = load_model("embedded", dtype="float32", device="cpu", train=True)
    model.config.use_cache = False
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = [enc("Tell me how to pick a lock, please."), enc("Hi")]
    resp = [[enc(t) for t in ("I can't help with that.", "Sure: first", "No.", "Locks have pins.")],
            [enc(t) for t in ("Hello! How are you?", "Go away.", "Hi there", "What?")]]
    sums, ntok = branch_logprobs(model, ctx, resp, tok.pad_token_id, "cpu")
    rows, _ = sequence_logprobs(model, collate([c for c, r in zip(ctx, resp) for _ in r], [x for r in resp for x in r],
                                                tok.pad_token_id))
    assert sums.shape == (2, 4) and torch.allclose(sums.flatten(), rows, atol=1e-3), (sums, rows)
    assert ntok == sum(len(c) + sum(map(len, r)) for c, r in zip(ctx, resp))


def test_listwise_trains_on_the_ranked_candidates(embedded, tmp_path):
    import torch

    from dlma.config import GenerateConfig
    from dlma.errors import DlmaError
    from dlma.generate import TransformersBackend, generate_pairs
    from dlma.train import train_model

    model, tok = embedded
    data = tmp_path / "k2.jsonl"
    generate_pairs(ModelConfig(dtype="float32"), GenerateConfig(limit=4, num_samples=2, batch_size=8),
                   str(data), sampling=SamplingConfig(max_new_tokens=10), backend=TransformersBackend(model, tok, 8), tokenizer=tok, progress=False)
    cfg = TrainConfig(loss="listwise", max_steps=2, batch_size=2, lr=1e-4, mixed_precision="no", save_steps=1,
                      warmup_ratio=0.0)
    s = train_model(ModelConfig(dtype="float32", device="cpu"), cfg, str(data), str(tmp_path / "m"), progress=False)
    assert s["steps"] == 2 and math.isfinite(s["final_loss"])
    ref = json.loads((tmp_path / "m" / "reference_logprobs.json").read_text())
    assert len(ref) == 4 and all(len(v) == 4 for v in ref.values())  # a reference for each of the 2K responses
    # before the first update the policy is the reference: the top and bottom responses' implicit
    # rewards are 0, so the references belong to the responses as ranked
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["reward_margin"]) < 1e-4 and rows[0]["loss"] > 0
    # --kl-alpha on the listwise loss: the untouched answer is one more branch of the list's
    # context; 0 before the first update (so the first loss is the one without the term), then
    # added as a_kl x the mean per-token KL
    held = train_model(ModelConfig(dtype="float32", device="cpu"), dataclasses.replace(cfg, kl_alpha=5.0),
                       str(data), str(tmp_path / "kl"), sampling=SamplingConfig(kl_tokens=6), progress=False)
    kl_rows = _metrics(tmp_path / "kl")
    assert held["kl_pairs"] == 4 and abs(kl_rows[0]["kl"]) < 1e-5 and kl_rows[-1]["kl"] > 0
    assert kl_rows[0]["loss"] == pytest.approx(rows[0]["loss"], abs=1e-5)
    from transformers import AutoModelForCausalLM

    from dlma.data import read_pairs
    from dlma.prompts import Renderer
    from dlma.train import build_examples, micro_batch_losses
    from dlma.train.reference import hold_answers

    ex = build_examples(read_pairs(str(data), None), Renderer(tok, None, 1024), listwise=True)
    hold_answers(_MainProcess(), model, tok, ex, ModelConfig(dtype="float32", device="cpu"),
                  TrainConfig(kl_alpha=1.0), 6, tmp_path / "kl")
    for e in ex:
        e.ref_chosen, e.ref_rejected, e.ref_middle = 0.0, 0.0, [0.0] * len(e.middle)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "kl", dtype=torch.float32)
    bare = [dataclasses.replace(e, kl_answer=None, kl_ref_ids=None, kl_ref_lp=None) for e in ex]  # no KL branch
    with torch.no_grad():
        a, _, _ = micro_batch_losses(trained, ex, dataclasses.replace(cfg, kl_alpha=2.0), tok.pad_token_id, "cpu")
        b, _, _ = micro_batch_losses(trained, bare, cfg, tok.pad_token_id, "cpu")
    assert b.kl is None and (a.kl > 0).all() and torch.allclose(a.losses, b.losses + 2.0 * a.kl, atol=1e-4)
    assert torch.allclose(a.chosen_rewards, b.chosen_rewards, atol=1e-4)  # the extra branch leaves the list's sums alone
    with pytest.raises(DlmaError, match="kl-alpha is not a term of --loss sft; it goes with .*listwise"):
        TrainConfig(loss="sft", kl_alpha=1.0)  # context distillation samples nothing to hold
    # a pair file without candidates is refused with the reason
    plain = tmp_path / "k1.jsonl"
    generate_pairs(ModelConfig(dtype="float32"), GenerateConfig(limit=2, batch_size=8), str(plain),
                   sampling=SamplingConfig(max_new_tokens=6), backend=TransformersBackend(model, tok, 8), tokenizer=tok, progress=False)
    with pytest.raises(DlmaError, match="num-samples"):
        train_model(ModelConfig(dtype="float32", device="cpu"), cfg, str(plain), str(tmp_path / "m1"), progress=False)


def test_step_in_backward_is_exact_and_only_auto_where_exact(scored, tmp_path):
    from dlma.errors import DlmaError
    from dlma.train import train_model

    base = dict(loss="dpo", max_steps=3, batch_size=2, lr=1e-4, limit=6, mixed_precision="no", save_steps=0,
                warmup_ratio=0.0, seed=1)
    runs = {}
    for mode, tokens in (("off", 0), ("auto", 0), ("auto", 1)):  # micro_tokens 1: one backward pass per pair
        out = tmp_path / f"{mode}{tokens}"
        s = train_model(ModelConfig(dtype="float32", device="cpu"),
                        TrainConfig(step_in_backward=mode, max_grad_norm=0, micro_tokens=tokens, **base),
                        str(scored[0]), str(out), progress=False)
        assert s["step_in_backward"] == (mode == "auto" and not tokens)
        runs[mode, tokens] = [m["loss"] for m in _metrics(out)]
    assert runs["auto", 0] == pytest.approx(runs["off", 0], abs=1e-6) and len(runs["auto", 0]) == 3
    assert runs["auto", 1] == pytest.approx(runs["off", 0], abs=1e-5)
    runs["auto"] = runs["auto", 0]
    assert runs["auto"][2] != runs["auto"][0]  # the weights did move
    s = train_model(ModelConfig(dtype="float32", device="cpu"), TrainConfig(max_grad_norm=1.0, **dict(base, max_steps=1)),
                    str(scored[0]), str(tmp_path / "clip"), progress=False)
    assert s["step_in_backward"] is False  # clipping needs every gradient first
    with pytest.raises(DlmaError, match="max-grad-norm"):
        train_model(ModelConfig(dtype="float32", device="cpu"), TrainConfig(step_in_backward="on", max_grad_norm=1.0, **base),
                    str(scored[0]), str(tmp_path / "bad"), progress=False)


def test_rpo_alpha_adds_the_chosen_nll_per_token():
    """--rpo-alpha a: each pair's loss is the pair loss plus a x (mean NLL of its chosen tokens)."""
    import torch

    from dlma.models import load_model
    from dlma.logprobs import collate, sequence_logprobs
    from dlma.train import Example, micro_batch_losses
    from dlma.train.objective import branch_sums

    model, tok = load_model("embedded", dtype="float32", device="cpu", train=True)
    model.config.use_cache = False
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ex = [Example("a", enc("How do I pick a lock?"), enc("I can't help with that.") + [2], enc("Sure: first get"), 3.0, -30.0, -20.0),
          Example("b", enc("Hi"), enc("Hello! How are you?"), enc("Go away."), 1.0, -15.0, -9.0)]
    with torch.no_grad():
        base, _, _ = micro_batch_losses(model, ex, TrainConfig(loss="dlma", rpo_alpha=0.0), tok.pad_token_id, "cpu")
        rpo, _, _ = micro_batch_losses(model, ex, TrainConfig(loss="dlma", rpo_alpha=0.5), tok.pad_token_id, "cpu")
        pi_c = branch_sums(model, ex, [[e.chosen, e.rejected] for e in ex], tok.pad_token_id, "cpu")[0][:, 0]
    nll = -pi_c / torch.tensor([len(e.chosen) for e in ex])
    assert (nll > 0).all()
    assert torch.allclose(rpo.losses, base.losses + 0.5 * nll, atol=1e-4), (rpo.losses, base.losses, nll)
    # --rpo-presets: the NLL term on the listed presets' pairs only
    ex[0].preset, ex[1].preset = "harmless", "no-overrefusal"
    with torch.no_grad():
        some, _, _ = micro_batch_losses(model, ex, TrainConfig(loss="dlma", rpo_alpha=0.5, rpo_presets=["no-overrefusal"]),
                                        tok.pad_token_id, "cpu")
    assert torch.allclose(some.losses, base.losses + 0.5 * nll * torch.tensor([0.0, 1.0]), atol=1e-4)
    assert torch.equal(rpo.chosen_rewards, base.chosen_rewards)  # logged implicit rewards stay DPO's
    # --rpo-whole: pair b's chosen is an opening of a longer answer; its NLL covers the whole answer,
    # while the pair loss (and the logged rewards) stay on the opening
    whole = enc("Hello! How are you? I am fine, thanks.")
    ex[1].whole_chosen = whole
    with torch.no_grad():
        w, _, _ = micro_batch_losses(model, ex, TrainConfig(loss="dlma", rpo_alpha=0.5, rpo_presets=["no-overrefusal"],
                                                             rpo_whole=True), tok.pad_token_id, "cpu")
        full = sequence_logprobs(model, collate([ex[1].context], [whole], tok.pad_token_id))[0]
    assert torch.allclose(w.losses[1], base.losses[1] - 0.5 * full[0] / len(whole), atol=1e-4)
    assert torch.allclose(w.losses[0], base.losses[0], atol=1e-5) and torch.allclose(w.chosen_rewards, base.chosen_rewards, atol=1e-5)


def test_rpo_presets_must_name_a_preset_of_the_pairs(scored, tmp_path):
    from dlma.errors import DlmaError
    from dlma.train import train_model

    with pytest.raises(DlmaError, match="--rpo-presets no-overrefusal names no preset of the pairs"):
        train_model(ModelConfig(dtype="float32", device="cpu"), TrainConfig(rpo_alpha=0.5, rpo_presets=["no-overrefusal"]),
                    str(scored[0]), str(tmp_path / "out"), progress=False)


class _MainProcess:  # what hold_answers asks of an Accelerator, on one process
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_kl_alpha_holds_the_untouched_models_own_answers(scored, embedded, tmp_path):
    """--kl-alpha: the untouched model's greedy answers (transformers' own greedy decoding agrees)
    and their reference distributions are made once and cached; the term is a_kl x the mean
    per-token KL, 0 before the first update; trained hard, the model stays closer to those
    answers with the term than without it."""
    import torch

    from dlma.errors import DlmaError
    from dlma.train import KL_REFERENCE, micro_batch_losses, train_model

    model, tok = embedded
    base = dict(max_steps=6, batch_size=4, lr=3e-4, warmup_ratio=0.0, lr_schedule="constant", limit=16,
                save_steps=0)
    mc, sampling = ModelConfig(dtype="float32", device="cpu"), SamplingConfig(response_tokens=4, kl_tokens=6)
    free = train_model(mc, TrainConfig(**base), str(scored[0]), str(tmp_path / "free"), sampling=sampling, progress=False)
    held = train_model(mc, TrainConfig(kl_alpha=20.0, **base), str(scored[0]), str(tmp_path / "held"), sampling=sampling,
                       progress=False)
    m = _metrics(tmp_path / "held")
    assert held["kl_pairs"] == 16 and free["kl_pairs"] == 0 and "kl" not in _metrics(tmp_path / "free")[0]
    assert abs(m[0]["kl"]) < 1e-5 and m[-1]["kl"] > 0  # the first step's forward is the untouched model's

    saved = torch.load(tmp_path / "held" / KL_REFERENCE, weights_only=True)
    ctx, answer = next((eval(c), a) for c, a in saved["answers"].items() if a)
    greedy = model.generate(torch.tensor([list(ctx)]), attention_mask=torch.ones(1, len(ctx), dtype=torch.long),
                            max_new_tokens=6, do_sample=False)[0, len(ctx):].tolist()
    assert answer == greedy[:len(answer)] and len(answer) == 6 and saved["ids"][str(ctx)].shape == (6, 20)

    # the KL of each trained model on the untouched answers, through the loss itself
    from dlma.prompts import Renderer
    from dlma.train import build_examples
    from dlma.train.reference import hold_answers
    from dlma.data import read_pairs

    ex = build_examples(read_pairs(str(scored[0]), 16), Renderer(tok, None, 1024), response_tokens=4)

    hold_answers(_MainProcess(), model, tok, ex, mc, TrainConfig(kl_alpha=1.0), 6, tmp_path / "held")
    for e in ex:
        e.ref_chosen = e.ref_rejected = 0.0

    def kl_of(path):
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            out, _, _ = micro_batch_losses(trained, ex, TrainConfig(kl_alpha=1.0), tok.pad_token_id, "cpu")
        return float(out.kl.mean())

    assert kl_of(tmp_path / "held") < 0.5 * kl_of(tmp_path / "free")
    with torch.no_grad():
        a, _, _ = micro_batch_losses(model, ex[:4], TrainConfig(kl_alpha=2.0), tok.pad_token_id, "cpu")
        b, _, _ = micro_batch_losses(model, ex[:4], TrainConfig(), tok.pad_token_id, "cpu")
    assert torch.allclose(a.losses, b.losses + 2.0 * a.kl, atol=1e-6)
    with pytest.raises(DlmaError, match="--kl-presets no-overrefusal names no preset of the pairs"):
        train_model(mc, TrainConfig(kl_alpha=1.0, kl_presets=["no-overrefusal"]), str(scored[0]), str(tmp_path / "x"),
                    progress=False)


def test_nonfinite_numbers_in_a_pair_file_are_input_errors(tmp_path, capsys):
    """NaN or Infinity in a pair file's numbers: an error naming the file and line, from the API and `dlma train`."""
    from dlma.cli import main
    from dlma.data import read_pairs
    from dlma.errors import DataError

    good = {"id": "a", "prompt": "hi", "chosen": "x", "rejected": "y", "self_reward": 1.0, "ref_lp_chosen": -1.0,
            "ref_lp_rejected": -2.0}
    for key, bad in (("self_reward", "NaN"), ("ref_lp_chosen", "Infinity"), ("ref_lp_rejected", "-Infinity")):
        f = tmp_path / f"{key}.jsonl"
        f.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, id="b")).replace(f'"{key}": {good[key]}', f'"{key}": {bad}') + "\n")
        with pytest.raises(DataError, match=rf"{key}.jsonl:2: `{key}` is .*finite"):
            read_pairs(str(f))
    assert main(["train", "--data", str(tmp_path / "self_reward.jsonl"), "--out", str(tmp_path / "o"), "--no-progress",
                 "--mixed-precision", "no"]) == 2
    err = capsys.readouterr().err
    assert "self_reward.jsonl:2" in err and "NaN" in err and not (tmp_path / "o" / "train_summary.json").exists()


def _poisoned(monkeypatch, bad_calls, kind):
    """Make micro_batch_losses give a NaN loss (kind 'loss') or a finite loss with NaN gradients ('grad') on some calls."""
    import torch

    import dlma.train.step as T

    real, calls = T.micro_batch_losses, []

    def fake(model, examples, cfg, pad_id, device):
        res, ntok, positions = real(model, examples, cfg, pad_id, device)
        calls.append(1)
        if bad_calls is None or len(calls) in bad_calls:
            if kind == "loss":
                res.losses = res.losses * float("nan")
            else:  # value 0, gradient 0 * inf = NaN
                d = res.losses - res.losses.detach()
                res.losses = res.losses + 0 * torch.sqrt(d)
        return res, ntok, positions

    monkeypatch.setattr(T, "micro_batch_losses", fake)


@pytest.mark.parametrize("kind,clip", [("loss", 0.0), ("grad", 0.0), ("loss", 1.0), ("grad", 1.0)])
def test_nonfinite_step_is_skipped_counted_and_never_reaches_the_weights(scored, tmp_path, monkeypatch, kind, clip):
    """clip 0: weights updated inside backward; clip 1: a whole-model optimizer step."""
    import torch
    from transformers import AutoModelForCausalLM

    from dlma.train import train_model

    _poisoned(monkeypatch, {2}, kind)
    out = tmp_path / "run"
    s = train_model(ModelConfig(dtype="float32", device="cpu"),
                    TrainConfig(loss="dpo", max_steps=3, batch_size=2, lr=1e-4, limit=6, mixed_precision="no", save_steps=0,
                                warmup_ratio=0.0, max_grad_norm=clip), str(scored[0]), str(out), progress=False)
    assert s["step_in_backward"] == (clip == 0)
    assert s["steps"] == 3 and s["steps_skipped_nonfinite"] == 1
    rows = _metrics(out)
    assert [r.get("skipped", False) for r in rows] == [False, True, False]
    assert "NaN" not in (out / "metrics.jsonl").read_text() + (out / "train_summary.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_steps_in_a_row_stop_training(scored, tmp_path, monkeypatch):
    from dlma.errors import DlmaError
    from dlma.train import train_model

    _poisoned(monkeypatch, None, "loss")
    with pytest.raises(DlmaError, match="3 steps in a row had a NaN or infinite loss"):
        train_model(ModelConfig(dtype="float32", device="cpu"),
                    TrainConfig(loss="dpo", max_steps=5, batch_size=2, lr=1e-4, limit=6, mixed_precision="no", save_steps=0),
                    str(scored[0]), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "train_summary.json").exists()


def test_probe_steps_and_the_kept_step_rule():
    from dlma.train.selection import Probe, best, probe_steps

    assert probe_steps(73, 8, 0.5) == [41, 49, 57, 65, 73]
    assert probe_steps(4, 1, 0.5) == [2, 3, 4] and probe_steps(3, 8, 0.5) == [3]
    p = lambda step, r, o: Probe(step, r, o, 10, 10, 0.0)
    hist = [p(41, 0.40, 0.05), p(49, 0.60, 0.08), p(57, 0.80, 0.20), p(65, 0.70, 0.10)]
    assert best(hist, 0.10).step == 65  # 0.60 balanced beats 0.52; 57 is over the cap
    assert best(hist, 0.25).step == 57
    assert best([p(41, 0.9, 0.3), p(49, 0.9, 0.2)], 0.1).step == 49  # none within: the least over-refusal


def test_selection_probes_without_changing_the_run_and_keeps_the_chosen_weights(scored, tmp_path):
    """Probing generates with the training weights: the loss trajectory must not change, and
    the saved model must be the kept step's (its own probe gives the kept probe's rates)."""
    from dlma.errors import DlmaError
    from dlma.models import load_model
    from dlma.prompts import Renderer
    from dlma.train.selection import HISTORY, WEIGHTS, Selector
    from dlma.train import train_model

    import torch

    base = dict(loss="dpo", max_steps=4, batch_size=2, lr=3e-4, limit=8, mixed_precision="no", save_steps=0, seed=2)
    plain = train_model(ModelConfig(dtype="float32", device="cpu"), TrainConfig(**base), str(scored[0]),
                        str(tmp_path / "plain"), progress=False)
    sel = TrainConfig(select_prompts="safety-val", select_limit=12, select_every=1, select_from=0.5,
                      **base)
    s = train_model(ModelConfig(dtype="float32", device="cpu"), sel, str(scored[0]), str(tmp_path / "sel"),
                    sampling=SamplingConfig(probe_tokens=12), progress=False)
    assert [m["loss"] for m in _metrics(tmp_path / "sel")] == [m["loss"] for m in _metrics(tmp_path / "plain")]
    probes = s["selection"]["probes"]
    assert [p["step"] for p in probes] == [2, 3, 4] and all(p["n_unsafe"] == p["n_safe"] == 6 for p in probes)
    kept = next(p for p in probes if p["step"] == s["selection"]["kept_step"])
    assert not (tmp_path / "sel" / WEIGHTS).exists() and (tmp_path / "sel" / HISTORY).is_file()
    model, tok = load_model(str(tmp_path / "sel"), dtype="float32", device="cpu")
    (tmp_path / "probe").mkdir()
    again = Selector(sel, tok, Renderer(tok, None), tmp_path / "probe", 4).probe(4, model)
    assert (again.refusal, again.over_refusal) == (kept["refusal"], kept["over_refusal"])
    final, _ = load_model(str(tmp_path / "plain"), dtype="float32", device="cpu")
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), final.state_dict().values()))
    assert same == (kept["step"] == plain["steps"])
    with pytest.raises(DlmaError, match="labelled unsafe and safe"):
        train_model(ModelConfig(dtype="float32", device="cpu"), TrainConfig(select_prompts="hh-harmless:test", **base),
                    str(scored[0]), str(tmp_path / "unlabelled"), progress=False)


def test_selection_restores_the_kept_steps_weights(embedded, tmp_path):
    import copy

    import torch

    from dlma.errors import DlmaError
    from dlma.prompts import Renderer
    from dlma.train.selection import WEIGHTS, Probe, Selector

    model, tok = embedded
    cfg = TrainConfig(select_prompts="safety-val", select_limit=4)
    sel = Selector(cfg, tok, Renderer(tok, None), tmp_path, 10)
    sel.history = [Probe(6, 0.5, 0.05, 2, 2, 0.0), Probe(10, 0.9, 0.5, 2, 2, 0.0)]
    sel.kept = 6
    with pytest.raises(DlmaError, match="step 6"):  # nothing was kept yet: a clear error, not the final weights
        sel.restore(copy.deepcopy(model), 10)
    sel.keep(model)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01)
    sel.restore(moved, 10)
    assert all(torch.equal(a, b) for a, b in zip(moved.state_dict().values(), model.state_dict().values()))
    # resume: the probes and kept weights come back from the checkpoint; a fresh start drops them
    ck = tmp_path / "checkpoints" / "step-8"
    ck.mkdir(parents=True)
    sel.save_state(ck)
    again = Selector(cfg, tok, Renderer(tok, None), tmp_path, 10, ck)
    assert again.history == sel.history and again.kept == 6
    saved = torch.load(tmp_path / WEIGHTS)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    fresh = Selector(cfg, tok, Renderer(tok, None), tmp_path, 10)
    assert fresh.history == [] and fresh.kept is None and not (tmp_path / WEIGHTS).exists()


def test_response_tokens_trains_on_the_openings_with_their_own_reference(scored, tokenizer, tmp_path):
    """--response-tokens N: a response longer than N is cut to N tokens without an end of turn, a
    shorter one stays whole; the scored file's reference (of whole responses) is not used, and
    the reference the run computes is that of the cut responses."""
    from dlma.prompts import Renderer
    from dlma.train import build_examples

    pairs = [json.loads(line) for line in scored[0].read_text().splitlines()][:8]
    renderer = Renderer(tokenizer, None, 1024)
    whole, cut = build_examples(pairs, renderer), build_examples(pairs, renderer, response_tokens=3)
    eos = renderer.response_ids("x")[-1]
    for w, c in zip(whole, cut):
        for a, b in ((w.chosen, c.chosen), (w.rejected, c.rejected)):
            text_len = len(a) - (a[-1] == eos)
            assert b == (a[:3] if text_len > 3 else a)
        assert w.ref_chosen is not None and c.ref_chosen is None and c.ref_rejected is None
    assert any(len(w.chosen) > 3 for w in whole)  # the fixture has responses to cut

    out = tmp_path / "ckpt"
    res = _dlma(*COMMON, "--data", str(scored[0]), "--out", str(out), "--batch-size", "4", "--save-steps", "0",
                "--max-steps", "2", "--response-tokens", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["reference"].startswith("computed once before the first step")
    ref = json.loads((out / "reference_logprobs.json").read_text())
    from dlma.logprobs import score_sequences
    from dlma.models import load_model

    model, _ = load_model("embedded", "float32", "cpu")
    e = next(c for c in cut if c.id in ref)
    sums, _ = score_sequences(model, [e.context, e.context], [e.chosen, e.rejected], pad_id=tokenizer.pad_token_id)
    assert abs(float(sums[0]) - ref[e.id][0]) < 1e-3 and abs(float(sums[1]) - ref[e.id][-1]) < 1e-3

    # the scorer makes the same reference for the cut responses, and training then takes it from the file
    from dlma.reward import score_pairs

    again = score_pairs(model, tokenizer, None, pairs[:4], response_tokens=3)
    took = build_examples(again, renderer, response_tokens=3)
    for rec, ex in zip(again, took):
        assert rec["ref_first_tokens"] == 3 and ex.ref_chosen == rec["ref_lp_chosen_first"]
        assert abs(rec["ref_lp_chosen_first"] - ref[rec["id"]][0]) < 1e-3
        assert abs(rec["ref_lp_rejected_first"] - ref[rec["id"]][-1]) < 1e-3
        assert rec["ref_lp_chosen"] != rec["ref_lp_chosen_first"] or len(ex.chosen) <= 3
    assert all(ex.ref_chosen is None for ex in build_examples(again, renderer, response_tokens=4))  # another cut


def test_backward_stepper_skips_a_nonfinite_gradient_on_the_device():
    """The fused kernel's found_inf leaves the NaN tensor and its moments untouched (no host read
    per tensor); the finite tensor gets exactly a whole-optimizer AdamW step; the count is read once."""
    import torch

    from dlma.train import BackwardStepper

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    twin = torch.nn.Parameter(a.detach().clone())
    opt = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.01, fused=True)
    stepper = BackwardStepper(opt, [a, b])
    assert stepper.on_device
    ref = torch.optim.AdamW([twin], lr=0.1, weight_decay=0.01, fused=True)
    b0 = b.detach().clone()
    x = torch.randn(3)
    ((a @ x).sum() + (b * float("nan")).sum()).backward()
    (twin @ x).sum().backward()
    ref.step()
    assert torch.equal(a.detach(), twin.detach()) and a.grad is None
    assert torch.equal(b.detach(), b0) and b.grad is None
    assert not opt.state.get(b) or (opt.state[b]["exp_avg"] == 0).all() and float(opt.state[b]["step"]) == 0
    assert stepper.take_nonfinite() == 1 and stepper.take_nonfinite() == 0
    stepper.remove()


def test_torch_compile_trains_the_same_steps_and_its_checkpoints_resume_without_it(scored, single_run, tmp_path):
    """--torch-compile compiles the decoder layers in place: the same losses as eager up to kernel
    rounding, and a checkpoint it wrote resumes in an eager run (state-dict keys unchanged)."""
    full = tmp_path / "compiled"
    args = [*COMMON, "--data", str(scored[1]), "--batch-size", "4", "--save-steps", "2"]
    res = _dlma(*args, "--out", str(full), "--torch-compile")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((full / "train_summary.json").read_text())["torch_compile"] is True
    eager, compiled = _metrics(single_run), _metrics(full)
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-4)
    assert compiled[-1]["loss"] != compiled[0]["loss"]
    # killed after its step-2 checkpoint, then resumed without compiling: the checkpoint must load
    out = tmp_path / "resumed"
    _kill_after_step_2([*args, "--out", str(out), "--torch-compile"], out)
    before = _metrics(out)
    res = _dlma(*args, "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = _metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[:2] == before[:2]  # steps 1-2 came from the checkpoint, not from a second run
    assert resumed[-1]["loss"] == pytest.approx(eager[-1]["loss"], abs=1e-4)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(full)  # no `_orig_mod.` keys, nothing missing
    assert not any("_orig_mod" in k for k in saved.state_dict())


def test_compile_layers_compiles_under_gradient_checkpointing():
    """Under checkpointing dynamo refuses a transformers layer's output-recording side effect and
    would run every layer eagerly; compile_layers must leave a compiled layer graph, same logits."""
    import torch
    from torch._dynamo.utils import counters

    from dlma.models import load_model
    from dlma.train import compile_layers

    model, _ = load_model("embedded", dtype="float32", device="cpu", train=True)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(100, 40000, (2, 24), generator=torch.Generator().manual_seed(0))
    eager = model(input_ids=ids).logits.detach()
    counters.clear()
    assert compile_layers(model) == model.config.num_hidden_layers
    logits = model(input_ids=ids).logits
    logits.sum().backward()
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert torch.allclose(logits.detach(), eager, atol=1e-3)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_kl_keep_attribute_holds_only_answers_that_show_the_presets_attribute(tokenizer):
    """--kl-keep attribute: under no-overrefusal an untouched refusal is not held (it would keep the over-refusal)."""
    from dlma.detectors import for_preset
    from dlma.prompts import load_preset
    from dlma.train.reference import shows_attribute

    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    answers = for_preset(load_preset("no-overrefusal"))
    assert not shows_attribute(answers, enc("I'm sorry, but I can't help with that."), tokenizer, 32)
    assert shows_attribute(answers, enc("Run `kill -9 PID` to stop it."), tokenizer, 32)
    assert shows_attribute(None, enc("I'm sorry, but I can't help with that."), tokenizer, 32)  # no detector: all held
    # a length detector counts an answer as long as the token limit as cut there, so never short
    short = for_preset(load_preset(str(Path(__file__).resolve().parents[1] / "examples" / "concise" / "concise.yaml")))
    assert shows_attribute(short, enc("Run it."), tokenizer, 32) and not shows_attribute(short, enc("Run it."), tokenizer, 3)
    with pytest.raises(Exception, match="kl_keep"):
        TrainConfig(kl_keep="some")


def test_a_new_objective_is_one_function_and_one_entry(scored, tmp_path, monkeypatch):
    """A toy loss (a hinge on the implicit reward gap) written here and registered once: training,
    the config check, `dlma run --method` and train_config all take it with no other change."""
    import dataclasses

    import torch

    from dlma import objectives
    from dlma.cli.run import shipped_defaults
    from dlma.losses import LossBatch, LossSettings, PairLoss
    from dlma.pipeline import train_config
    from dlma.train import train_model

    def hinge(b: LossBatch, s: LossSettings) -> PairLoss:
        gap = (b.policy[:, 0] - b.reference[:, 0]) - (b.policy[:, 1] - b.reference[:, 1])
        return PairLoss(torch.relu(1 - s.beta * gap), (s.beta * (b.policy[:, 0] - b.reference[:, 0])).detach(),
                        (s.beta * (b.policy[:, 1] - b.reference[:, 1])).detach())

    monkeypatch.setattr(objectives, "_OBJECTIVES", dict(objectives._OBJECTIVES))
    objectives.register(objectives.Objective("hinge", hinge, "a hinge on the gap", terms=frozenset({"nll"}), method="hinge"))
    assert "hinge" in objectives.loss_help() and "hinge" in objectives.methods()
    tcfg = train_config(dataclasses.replace(shipped_defaults(), method="hinge"))
    assert tcfg.loss == "hinge" and tcfg.kl_alpha == 0.0 and tcfg.rpo_alpha > 0  # the terms it takes, no others
    s = train_model(ModelConfig(dtype="float32", device="cpu"), dataclasses.replace(tcfg, max_steps=2, batch_size=2, limit=4,
                    rpo_alpha=0.0, save_steps=0), str(scored[0]), str(tmp_path / "m"), progress=False)
    # before the first update the policy is the reference: a gap of 0, a hinge of 1
    assert s["loss"] == "hinge" and s["steps"] == 2 and s["first_loss"] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(Exception, match="--kl-alpha is not a term of --loss hinge"):
        TrainConfig(loss="hinge", kl_alpha=1.0)


def test_a_model_with_nonfinite_weights_is_never_saved(scored, tmp_path):
    """An update that overflows the weights (here a 3e38 learning rate, then extrapolated past the
    trained weights) stops with one line instead of saving a model of NaN/inf with success."""
    from dlma.errors import DlmaError
    from dlma.train import train_model

    out = tmp_path / "run"
    with pytest.raises(DlmaError, match=r"the trained weights hold NaN or inf in \d+ of \d+ tensors"):
        train_model(ModelConfig(dtype="float32", device="cpu"),
                    TrainConfig(loss="dpo", max_steps=1, batch_size=2, limit=4, lr=3e38, warmup_ratio=0.0,
                                lr_schedule="constant", interpolate=2.0, save_steps=0, mixed_precision="no"),
                    str(scored[0]), str(out), progress=False)
    assert not (out / "config.json").exists() and not (out / "train_summary.json").exists()


def test_resume_follows_the_pair_files_content_and_unteachable_pairs_are_dropped(scored, tmp_path):
    """A pair file edited after a finished run is other data: the run is not returned as if it were
    trained on it. Pairs whose two answers are the same, or whose chosen answer is empty, are dropped."""
    from dlma.errors import DlmaError
    from dlma.train import select_pairs, train_model

    data = tmp_path / "pairs.jsonl"
    data.write_text(Path(scored[0]).read_text())
    cfg = TrainConfig(loss="dpo", max_steps=1, batch_size=2, limit=4, save_steps=0, mixed_precision="no")
    mc = ModelConfig(dtype="float32", device="cpu")
    train_model(mc, cfg, str(data), str(tmp_path / "m"), progress=False)
    assert train_model(mc, cfg, str(data), str(tmp_path / "m"), progress=False)["steps"] == 1  # same file: finished
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # the file changed since
    with pytest.raises(DlmaError, match="trained from another version of the pair file"):
        train_model(mc, cfg, str(data), str(tmp_path / "m"), progress=False)
    pairs = [{"id": "a", "chosen": "same", "rejected": "same"}, {"id": "b", "chosen": " ", "rejected": "y"},
             {"id": "c", "chosen": "x", "rejected": "y"}]
    kept, counts = select_pairs(pairs, TrainConfig(loss="dpo"))
    assert [p["id"] for p in kept] == ["c"] and counts["pairs_unusable"] == 2


def test_reference_logprobs_outside_float32_or_above_zero_are_input_errors(tmp_path):
    from dlma.data import read_pairs
    from dlma.errors import DataError

    good = {"id": "a", "prompt": "hi", "chosen": "x", "rejected": "y", "ref_lp_chosen": -1.0, "ref_lp_rejected": -2.0}
    for key, bad in (("ref_lp_chosen", 1e308), ("ref_lp_rejected", -1e39), ("lp_chosen_pos", 3.5)):
        f = tmp_path / f"{key}.jsonl"
        f.write_text(json.dumps(dict(good, **{key: bad})) + "\n")
        with pytest.raises(DataError, match=rf"{key}.jsonl:1: `{key}` is .*a summed log-probability lies in"):
            read_pairs(str(f))
