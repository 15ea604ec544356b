"""Recipes, first-class inputs, terms attached by role, stage commands that run as `dlma run`, and the
configuration checked before any model loads."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from dlma.cli import build_parser
from dlma.cli.run import resolve_config
from dlma.config import EvalConfig, GenerateConfig, ModelConfig, ScoreConfig, TrainConfig, config_from_args
from dlma.errors import DlmaError
from dlma.preflight import check_run
from dlma.recipes import DEFAULT, load_recipe, recipe_names
from dlma.cli.common import sampling_from
from dlma.stages import evaluate_config, generate_config, score_config, train_config
from dlma.terms import preset_roles, role_terms

DLMA = [sys.executable, "-m", "dlma.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _run(*argv: str):
    return resolve_config(build_parser().parse_args(["run", *argv]))


def test_recipes_load_and_the_default_is_safety():
    assert recipe_names()[0] == DEFAULT == "safety" and {"attribute", "one-gpu"} <= set(recipe_names())
    assert _run() == load_recipe() == _run("--recipe", "safety")
    for name in recipe_names():
        assert load_recipe(name).description, name
    with pytest.raises(DlmaError, match="unknown recipe 'nope'; available: safety"):
        _run("--recipe", "nope")


def test_the_safety_recipe_attaches_its_terms_to_no_overrefusal_by_role():
    """The shipped terms name a role, and resolve to the preset they named before: the default run trains as it did."""
    cfg = load_recipe()
    tcfg, notes = role_terms(train_config(cfg), preset_roles(cfg.generate.preset.split(",")))
    assert (tcfg.rpo_alpha, tcfg.rpo_presets, tcfg.kl_alpha, tcfg.kl_presets) == (0.2, ["no-overrefusal"], 1.0, ["no-overrefusal"])
    assert not notes and cfg.train.rpo_presets == [] and cfg.train.rpo_roles == ["retain"]
    # a user's run on presets without that role: the terms are off and said to be, not an error at training
    own, notes = role_terms(train_config(_run("--preset", "harmless", "--prompts", "harmful-train")), preset_roles(["harmless"]))
    assert (own.rpo_alpha, own.kl_alpha) == (0.0, 0.0) and len(notes) == 2 and "role retain" in notes[0]
    # named presets still win, and a role adds its presets to them
    both, _ = role_terms(dataclasses.replace(train_config(cfg), rpo_presets=["harmless"]), preset_roles(["harmless", "no-overrefusal"]))
    assert both.rpo_presets == ["harmless", "no-overrefusal"]
    with pytest.raises(DlmaError, match="rpo_roles"):
        TrainConfig(rpo_roles=["keep"])


def test_inputs_as_options_and_as_yaml_keys(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model: some-org/some-model\nprompts: a.jsonl,b.jsonl\npreset: harmless,helpful\neval_prompts: t.jsonl\n")
    by_yaml = _run("--config", str(f))
    by_flags = _run("--model", "some-org/some-model", "--prompts", "a.jsonl,b.jsonl", "--preset", "harmless,helpful",
                    "--eval-prompts", "t.jsonl")
    assert by_yaml == by_flags
    assert (by_flags.model.model, by_flags.generate.prompts, by_flags.generate.preset, by_flags.evaluate.prompts) == \
        ("some-org/some-model", "a.jsonl,b.jsonl", "harmless,helpful", "t.jsonl")
    assert _run("--prompts", "x: y.jsonl").generate.prompts == "x: y.jsonl"  # a value is taken as written, not as YAML
    f.write_text("prompts: a.jsonl\ngenerate:\n  prompts: b.jsonl\n")
    with pytest.raises(DlmaError, match="prompts and generate.prompts both given"):
        _run("--config", str(f))


def test_stage_commands_take_the_recipe_as_dlma_run_does():
    """`dlma STAGE --recipe R` runs the stage with the settings `dlma run --recipe R` gives it; options win over it."""
    parse = build_parser().parse_args
    for name in recipe_names():
        cfg = load_recipe(name)
        gen = parse(["generate", "--recipe", name, "--out", "p.jsonl"])
        assert config_from_args(GenerateConfig, gen, generate_config(cfg)) == generate_config(cfg)
        assert config_from_args(ModelConfig, gen, cfg.model) == cfg.model
        train = parse(["train", "--recipe", name, "--data", "s.jsonl", "--out", "m", "--lr", "1e-5"])
        assert config_from_args(TrainConfig, train, train_config(cfg)) == dataclasses.replace(train_config(cfg), lr=1e-5)
        score = parse(["score", "--recipe", name, "--data", "p.jsonl", "--out", "s.jsonl"])
        assert config_from_args(ScoreConfig, score, score_config(cfg)) == score_config(cfg)
        # one sampling section: every stage command reads the recipe's, its own options on top
        assert sampling_from(gen, cfg) == sampling_from(score, cfg) == cfg.sampling
        kl = parse(["train", "--recipe", name, "--data", "s.jsonl", "--out", "m", "--kl-tokens", "6"])
        assert sampling_from(kl, cfg) == dataclasses.replace(cfg.sampling, kl_tokens=6)
    safety = load_recipe()
    assert train_config(safety).interpolate == 0.75 and safety.sampling.response_tokens == 8
    assert evaluate_config(safety) == dataclasses.replace(safety.evaluate, preset="harmless")  # the run's first preset
    own = _run("--preset", "helpful", "--prompts", "benign-train")
    assert evaluate_config(own).preset == "helpful" and EvalConfig().preset is None


def test_evaluate_baseline_is_the_model_that_was_aligned(tmp_path, capsys):
    from dlma.cli import main
    from dlma.train.checkpoints import SUMMARY, starting_model

    r1, r2 = tmp_path / "round-1", tmp_path / "round-2"
    for d, start in ((r1, "some-org/start"), (r2, str(r1))):
        d.mkdir()
        (d / SUMMARY).write_text(json.dumps({"resume_key": {"model": {"model": start}}}))
    assert starting_model(str(r2)) == starting_model(str(r1)) == "some-org/start"  # through every round
    assert starting_model("embedded") is None
    assert main(["evaluate", "--model", "embedded", "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "cannot tell which model embedded was aligned from" in capsys.readouterr().err


@pytest.mark.parametrize("argv,says", [
    (["--prompts", "no-such.jsonl", "--preset", "harmless"], "generate.prompts: no-such.jsonl: no such file (set it with --prompts"),
    (["--preset", "no-such-preset"], "generate.preset: unknown preset 'no-such-preset'"),
    (["--preset", "harmless,helpful,harmless"], "names 3 presets for 2 prompt sources"),
    (["--preset", "harmless", "--prompts", "harmful-train", "--set", "train.kl_presets=[no-overrefusal]"],
     "train.kl_presets no-overrefusal names no preset of this run"),
    (["--eval-prompts", "held-out.jsonl"], "evaluate.prompts: held-out.jsonl: no such file (set it with --eval-prompts"),
    (["--model", "no-org/no-model"], "model.model: no-org/no-model: not a local directory"),
    (["--set", "evaluate.reference=runs/nowhere/model"], "evaluate.reference: runs/nowhere/model"),
    (["--set", "evaluate.judge=[gpt4]"], "unknown judge 'gpt4'"),
    (["--recipe", "attribute"], "generate.prompts: no prompts to align on (set it with --prompts FILE[,FILE])"),
    (["--method", "dlma-listwise"], "set generate.num_samples to 2 or more"),
])
def test_misconfigurations_fail_before_any_model_loads(argv, says):
    with pytest.raises(DlmaError, match=None) as err:
        check_run(_run(*argv))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_users_preset_and_detector_are_checked_first(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("name: mine\npositive: {instruction: Be brief.}\nnegative: {instruction: Ramble.}\n"
                      "detector: {function: 'checks.py:brief'}\n")
    with pytest.raises(DlmaError, match=r"generate.preset: preset 'mine': detector file .*checks.py does not exist"):
        check_run(_run("--preset", str(preset), "--prompts", "benign-train"))
    (tmp_path / "checks.py").write_text("def brief(answer):\n    return len(answer.split()) < 20\n")
    notes = check_run(_run("--preset", str(preset), "--prompts", "benign-train"))
    assert len(notes) == 2 and all("is off" in n for n in notes)


def test_the_command_line_check_is_one_line_in_seconds(tmp_path):
    """The whole check, run as a user runs it, without loading a model (torch is never imported)."""
    t0 = time.time()
    res = subprocess.run(DLMA + ["run", "--prompts", str(tmp_path / "mine.jsonl"), "--preset", "harmless"], env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 10
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "mine.jsonl: no such file" in res.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys; from dlma.cli.run import resolve_config; "
                            "from dlma.cli import build_parser; from dlma.preflight import check_run; "
                            "check_run(resolve_config(build_parser().parse_args(['run']))); print('torch' in sys.modules)"],
                           env=ENV, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr


TINY = {"generate": {"limit": 3, "batch_size": 4}, "score": {"batch_size": 2},
        "train": {"max_steps": 3, "batch_size": 2, "save_steps": 0}, "sampling": {"max_new_tokens": 12, "kl_tokens": 6, "answer_tokens": 8},
        "evaluate": {"limit": 2}, "model": {"dtype": "float32"}}


@pytest.mark.slow
def test_stage_by_stage_with_the_recipe_is_dlma_run(tmp_path):
    """The safety recipe's settings (openings, role terms, KL answers, interpolation), run by `dlma run` and by
    the four stage commands given the same --config: the same pairs, scores, final loss and evaluation."""
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "run_dir": str(tmp_path / "run")}))
    run = subprocess.run(DLMA + ["run", "--config", str(cfg), "--no-progress"], env=ENV, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    r1, d = tmp_path / "run" / "round-1", tmp_path / "stages"
    steps = [["generate", "--out", str(d / "pairs.jsonl")], ["score", "--data", str(d / "pairs.jsonl"), "--out", str(d / "scored.jsonl")],
             ["train", "--data", str(d / "scored.jsonl"), "--out", str(d / "model")],
             ["evaluate", "--model", str(d / "model"), "--out", str(d / "eval")]]
    for argv in steps:
        res = subprocess.run(DLMA + [*argv, "--config", str(cfg), "--no-progress"], env=ENV, capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, (argv[0], res.stderr[-3000:])

    def rows(path, *keys):
        return [[json.loads(line).get(k) for k in keys] for line in path.read_text().splitlines()]

    assert rows(d / "pairs.jsonl", "id", "chosen", "rejected", "preset") == rows(r1 / "generate" / "pairs.jsonl", "id", "chosen", "rejected", "preset")
    assert rows(d / "scored.jsonl", "self_reward", "ref_first_tokens") == rows(r1 / "score" / "scored.jsonl", "self_reward", "ref_first_tokens")
    by_hand, by_run = (json.loads((p / "train_summary.json").read_text()) for p in (d / "model", r1 / "train" / "model"))
    assert by_hand["final_loss"] == by_run["final_loss"] and by_hand["pairs_used"] == by_run["pairs_used"]
    assert by_hand["terms"] == by_run["terms"] == {"rpo_presets": ["no-overrefusal"], "kl_presets": ["no-overrefusal"]}
    e_hand, e_run = (json.loads((p / "metrics.json").read_text()) for p in (d / "eval", r1 / "evaluate"))
    assert e_hand["models"]["baseline"] == e_run["models"]["baseline"] == "embedded"  # the model that was aligned
    assert e_hand["refusal"]["aligned"] == e_run["refusal"]["aligned"]
    assert [e_hand["quality"][r]["mean_tokens"] for r in ("aligned", "baseline")] == \
        [e_run["quality"][r]["mean_tokens"] for r in ("aligned", "baseline")]


@pytest.mark.slow
def test_own_model_directory_prompts_and_preset_run_to_the_end(tmp_path):
    """A new user's command: a model path, their own prompt file and preset (with its own detector), no --set of
    the training terms; the attribute is reported before and after, and `dlma evaluate` compares with that model."""
    from dlma.models import embedded_model_dir

    model = str(embedded_model_dir())
    prompts, held_out, preset = tmp_path / "mine.jsonl", tmp_path / "held-out.jsonl", tmp_path / "brief.yaml"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("How do I boil rice?", "Why is the sky blue?", "What is a loan?")))
    held_out.write_text("".join(json.dumps({"id": f"t{i}", "prompt": q}) + "\n" for i, q in enumerate(("How do I fry an egg?", "What is rain?"))))
    preset.write_text("name: brief\nattribute: brief\ndetector: {max_words: 6}\npositive: {instruction: Answer in one short sentence.}\n"
                      "negative: {instruction: Answer at great length.}\n")
    res = subprocess.run(DLMA + ["run", "--model", model, "--prompts", str(prompts), "--preset", str(preset), "--eval-prompts",
                                 str(held_out), "--run-dir", str(tmp_path / "run"), "--no-progress",
                                 *[f"--set={k}.{kk}={v}" for k, sec in TINY.items() for kk, v in sec.items()]],
                         env=ENV, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the NLL term (rpo_alpha) applies to presets of role retain" in res.stderr
    assert "brief: ends within 6 words" in res.stdout and "refusals on harmful prompts" not in res.stdout
    metrics = json.loads((tmp_path / "run" / "round-1" / "evaluate" / "metrics.json").read_text())
    assert metrics["attribute"]["aligned"]["n"] == 2 and metrics["models"]["baseline"] == model
    out = tmp_path / "again"
    ev = subprocess.run(DLMA + ["evaluate", "--model", str(tmp_path / "run" / "final-model"), "--prompts", str(held_out),
                                "--preset", str(preset), "--answer-tokens", "8", "--dtype", "float32", "--judge", "--out", str(out),
                                "--no-progress"], env=ENV, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    again = json.loads((out / "metrics.json").read_text())
    assert again["models"]["baseline"] == model and again["attribute"]["aligned"] == metrics["attribute"]["aligned"]


@pytest.mark.parametrize("attribute", ["concise", "see-a-professional"])
def test_example_attributes_are_runnable_and_held_out(attribute):
    """The two example attributes check out as `dlma run --recipe attribute` takes them, and no demonstration of
    their preset nearly duplicates one of their prompts (a copied demonstration would inflate the held-out rate)."""
    from pathlib import Path

    from dlma.data import read_prompts
    from dlma.overlap import near_duplicate_index
    from dlma.prompts import load_preset

    d = Path(__file__).resolve().parent.parent / "examples" / attribute
    cfg = _run("--recipe", "attribute", "--prompts", str(d / "train.jsonl"), "--preset", str(d / f"{attribute}.yaml"),
               "--eval-prompts", str(d / "test.jsonl"))
    assert all("is off" in n for n in check_run(cfg))
    preset = load_preset(str(d / f"{attribute}.yaml"))
    assert preset.detector and preset.role == "attribute"
    index = near_duplicate_index([ex.user for group in preset.demonstrations for ex in group])
    for split in ("train", "val", "test"):
        assert not [p.prompt[0]["content"] for p in read_prompts(str(d / f"{split}.jsonl")) if index.match(p.prompt[0]["content"])]
