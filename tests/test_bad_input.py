"""Bad input and options give one line `dlma CMD: error: ...` (exit 2), never a traceback.

The commands run in-process through `dlma.cli.main`: an exception other than DlmaError would
escape main and fail the test with its traceback.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from bad_inputs import CASES, HANDLED, running
from dlma.cli import main
from dlma.config import EvalConfig, GenerateConfig, RunConfig, SamplingConfig, ScoreConfig, TrainConfig, apply_overrides, load_yaml
from dlma.errors import DlmaError


def _error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith(f"dlma {argv[0]}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def files(tmp_path):
    good = json.dumps({"id": "a", "prompt": "Hello there", "chosen": "Hi", "rejected": "Go away"}) + "\n"
    (tmp_path / "good.jsonl").write_text(good)
    (tmp_path / "latin1.jsonl").write_bytes(good.encode() + json.dumps({"id": "b", "prompt": "x"}).encode()[:-2]
                                            + "caf\xe9\"}\n".encode("latin-1"))
    data = gzip.compress((good * 200).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    return tmp_path


def test_unreadable_files(files, capsys):
    out = str(files / "out.jsonl")
    err = _error(capsys, ["generate", "--prompts", str(files / "latin1.jsonl"), "--out", out, "--no-progress"])
    assert "latin1.jsonl:2: not UTF-8" in err
    err = _error(capsys, ["score", "--data", str(files / "latin1.jsonl"), "--out", out, "--no-progress"])
    assert "latin1.jsonl:2: not UTF-8" in err
    err = _error(capsys, ["score", "--data", str(files / "cut.jsonl.gz"), "--out", out, "--no-progress"])
    assert "cut.jsonl.gz" in err and "cut short or corrupt" in err
    err = _error(capsys, ["generate", "--prompts", str(files / "cut.jsonl.gz"), "--out", out, "--no-progress"])
    assert "cut short or corrupt" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_one_line(files, capsys):
    out = str(files / "out.jsonl")
    for cmd in (["generate", "--prompts", str(files / "good.jsonl")], ["score", "--data", str(files / "good.jsonl")],
                ["train", "--data", str(files / "good.jsonl"), "--loss", "sft"]):
        err = _error(capsys, cmd + ["--device", "cuda", "--out", out, "--no-progress"])
        assert "no CUDA GPU" in err
    assert "unknown device" in _error(capsys, ["generate", "--prompts", str(files / "good.jsonl"), "--device", "gpu0",
                                               "--out", out, "--no-progress"])


@pytest.mark.parametrize("argv,field", [
    (["generate", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "--batch-size", "0"], "batch_size"),
    (["generate", "--batch-size", "-4"], "batch_size"),
    (["generate", "--num-pairs", "0"], "num_pairs"),
    (["generate", "--top-p", "5"], "top_p"),
    (["generate", "--top-p", "0"], "top_p"),
    (["generate", "--temperature", "-1"], "temperature"),
    (["generate", "--max-context", "-5"], "max_context"),
    (["generate", "--limit", "0"], "limit"),
    (["score", "--data", "x.jsonl", "--batch-size", "0"], "batch_size"),
    (["score", "--data", "x.jsonl", "--batch-size", "-1"], "batch_size"),
    (["score", "--data", "x.jsonl", "--max-context", "-5"], "max_context"),
    (["train", "--data", "x.jsonl", "--lr=-1e-5"], "lr"),
    (["train", "--data", "x.jsonl", "--batch-size", "0"], "batch_size"),
    (["train", "--data", "x.jsonl", "--max-context", "0"], "max_context"),
    (["evaluate", "--answer-tokens", "0"], "answer_tokens"),
    (["evaluate", "--answer-top-p", "1.5"], "answer_top_p"),
    (["train", "--data", "x.jsonl", "--kl-tokens", "0"], "kl_tokens"),
    (["score", "--data", "x.jsonl", "--response-tokens", "0"], "response_tokens"),
    (["evaluate", "--batch-size", "0"], "batch_size"),
    (["generate", "--dtype", "float8"], "dtype"),
])
def test_out_of_range_options(tmp_path, capsys, argv, field):
    err = _error(capsys, argv + ["--out", str(tmp_path / "out"), "--no-progress"])
    assert f"{field} (--{field.replace('_', '-')}) must be" in err
    assert not (tmp_path / "out").exists()


def test_the_same_checks_for_yaml_set_and_python(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("sampling:\n  top_p: 5\n")
    err = _error(capsys, ["run", "--config", str(f), "--run-dir", str(tmp_path / "r")])
    assert "c.yaml.sampling: top_p (--top-p) must be in (0, 1], got 5" in err
    err = _error(capsys, ["run", "--set", "train.lr=-1", "--run-dir", str(tmp_path / "r")])
    assert "lr (--lr) must be at least 0" in err
    for cls, kw in ((GenerateConfig, {"num_pairs": 0}), (SamplingConfig, {"max_context": 64, "max_new_tokens": 64}),
                    (ScoreConfig, {"batch_size": 0}), (TrainConfig, {"lr": -1.0}), (SamplingConfig, {"answer_temperature": -1.0})):
        with pytest.raises(DlmaError, match="must be"):
            cls(**kw)
    assert GenerateConfig(limit=None).limit is None and TrainConfig(max_steps=None).max_steps is None


def test_a_config_written_before_the_sampling_section_is_read_with_its_settings_moved(tmp_path, capsys):
    """Decoding settings once lived in the stage sections; an older YAML (or a stored run's) still loads,
    each value where it now lives, and says so; two values for one setting are refused; --set names the new key."""
    f = tmp_path / "old.yaml"
    f.write_text("generate:\n  max_new_tokens: 20\n  temperature: 0.5\nevaluate:\n  max_new_tokens: 40\n"
                 "train:\n  response_tokens: 4\n  select_max_new_tokens: 9\nscore:\n  max_context: null\n")
    s = load_yaml(RunConfig, str(f)).sampling
    assert (s.max_new_tokens, s.temperature, s.answer_tokens, s.response_tokens, s.probe_tokens) == (20, 0.5, 40, 4, 9)
    assert s.max_context == 1024  # an older dump's null ("the model's own") keeps the default
    assert "generate.max_new_tokens -> sampling.max_new_tokens" in capsys.readouterr().err
    f.write_text("generate:\n  max_context: 512\nevaluate:\n  max_context: 2048\n")
    with pytest.raises(DlmaError, match="disagree"):
        load_yaml(RunConfig, str(f))
    with pytest.raises(DlmaError, match=r"--set sampling.kl_tokens=4"):
        apply_overrides(RunConfig(), ["train.kl_tokens=4"])


@pytest.mark.parametrize("cls,kw", [
    (TrainConfig, {"lr": math.inf}), (TrainConfig, {"interpolate": math.inf}), (TrainConfig, {"margin_weight": math.nan}),
    (TrainConfig, {"beta": math.inf}), (TrainConfig, {"margin_clip": (-math.inf, 40.0)}), (TrainConfig, {"min_reward": math.nan}),
    (TrainConfig, {"kl_alpha": math.inf}), (TrainConfig, {"warmup_ratio": math.nan}), (SamplingConfig, {"temperature": math.nan}),
    (EvalConfig, {"judge_timeout": math.inf}),
])
def test_numbers_that_reach_the_weights_are_finite(cls, kw):
    """--lr inf and --interpolate inf saved a model of NaNs with exit 0; --margin-weight nan skipped every step."""
    (name,) = kw
    with pytest.raises(DlmaError, match=rf"{name} \(--{name.replace('_', '-')}\) must be a finite number"):
        cls(**kw)


def test_set_values_are_not_silently_converted():
    """--set generate.limit=2.9 became 2, [a,b] the string "['a', 'b']", yes the learning rate 1.0."""
    from dlma.config import RunConfig, apply_overrides, from_dict

    for key, value, says in (("generate.limit", "2.9", "not a whole number"), ("generate.limit", ".inf", "not a whole number"),
                             ("generate.prompts", "[a,b]", "comma-separated: a,b"), ("train.lr", "yes", "not a number"),
                             ("seeds", "[1.5]", "not a whole number"), ("train.margin_clip", "[true, 2]", "not a number"),
                             ("run_dir", "", "run_dir (--run-dir) must be a directory")):
        with pytest.raises(DlmaError, match=re.escape(says)):
            apply_overrides(RunConfig(), [f"{key}={value}"])
    assert apply_overrides(RunConfig(), ["generate.limit=3.0", "generate.prompts=a,b"]).generate.limit == 3
    assert from_dict(GenerateConfig, {"limit": 4}).limit == 4


def test_an_unreachable_hub_is_one_line_at_once(tmp_path):
    """A model id that is not cached, the Hub out of reach and HF_HUB_OFFLINE unset: transformers
    printed ~23 retry lines over ~46 s before the error."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "prompt": "Hi", "chosen": "x", "rejected": "y"}) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # a closed port; nothing cached
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "dlma.cli", "score", "--data", str(tmp_path / "p.jsonl"), "--out",
                          str(tmp_path / "s.jsonl"), "--no-progress", "--model", "no-such-org/no-such-model"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "cannot load model 'no-such-org/no-such-model' (not cached): http://127.0.0.1:9 cannot be reached" in res.stderr
    assert time.time() - t0 < 30


@pytest.mark.parametrize("broken", ["tokenizer-only directory", "unknown id"])
def test_a_model_that_cannot_be_loaded_is_the_same_one_line_in_every_command(files, capsys, tokenizer, broken):
    if broken == "unknown id":
        model = "no-such-org/no-such-model"
    else:  # a directory whose tokenizer loads but whose weights are missing: train used to crash here
        model = str(files / "tok-only")
        tokenizer.save_pretrained(model)
    good, out = str(files / "good.jsonl"), str(files / "out")
    errs = [_error(capsys, ["generate", "--prompts", good, "--model", model, "--out", out + ".g", "--no-progress"]),
            _error(capsys, ["score", "--data", good, "--model", model, "--out", out + ".s", "--no-progress"]),
            _error(capsys, ["train", "--data", good, "--loss", "sft", "--model", model, "--out", out + ".t", "--no-progress",
                            "--mixed-precision", "no"])]
    for err in errs:  # the same message from models._cannot_load, whether the tokenizer or the weights failed first
        assert re.fullmatch(rf"dlma \w+: error: cannot load model {re.escape(repr(model))} \((tokenizer|weights)\): .+ Use 'embedded', "
                            r"a local directory, or a Hugging Face id that is cached \(offline: HF_HUB_OFFLINE=1\)", err), err


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_catalogue(case, tmp_path, capsys):
    """Every entry of the bad-input catalogue (docs/bad-input.md): one line, naming the problem, and
    nothing written: the files the case starts from are as they were."""
    with running(case, tmp_path) as argv:
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")}
        err = _error(capsys, argv)
    assert case.says in err, err
    assert {p: p.read_bytes() for p in before} == before


def test_every_handled_misuse_names_a_test_that_exists():
    """The rows of docs/bad-input.md for misuse that gets correct output each point at their test."""
    import importlib

    for h in HANDLED:
        path, name = h.test.split("::")
        module = importlib.import_module(path.removeprefix("tests/").removesuffix(".py"))
        assert callable(getattr(module, name, None)), h.test
