"""`dlma run`: config, stages, resume after kills, lock, method comparison (tiny sizes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlma.cli import build_parser
from dlma.cli.run import resolve_config
from dlma.errors import DlmaError

DLMA = [sys.executable, "-m", "dlma.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--set", "generate.limit=5", "--set", "generate.num_pairs=1", "--set", "sampling.max_new_tokens=12",
        "--set", "generate.batch_size=4",
        "--set", "score.batch_size=1", "--set", "train.max_steps=6", "--set", "train.batch_size=2", "--set", "sampling.kl_tokens=8",
        "--set", "train.save_steps=2", "--set", "evaluate.limit=2", "--set", "sampling.answer_tokens=8",
        "--set", "model.dtype=float32"]


def _args(*argv: str):
    return build_parser().parse_args(["run", *argv])


def test_config_layers(tmp_path):
    from dlma.cli.run import shipped_defaults

    shipped = shipped_defaults()
    cfg = resolve_config(_args())
    assert cfg == shipped and cfg.method == "dlma" and "harmless" in cfg.generate.preset
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  beta: 0.3\ngenerate:\n  limit: 7\n")
    cfg = resolve_config(_args("--config", str(f), "--set", "train.beta=0.5", "--method", "rlcd"))
    assert (cfg.train.beta, cfg.generate.limit, cfg.method) == (0.5, 7, "rlcd")
    assert cfg.generate.preset == shipped.generate.preset  # untouched keys keep the shipped defaults
    with pytest.raises(DlmaError, match="unknown key 'betta'"):
        resolve_config(_args("--set", "train.betta=1"))
    with pytest.raises(DlmaError, match="not a valid float"):
        resolve_config(_args("--set", "train.beta=high"))


def test_method_train_is_typed_like_the_config(tmp_path):
    """YAML reads `5e-7` (no dot) as a string: a method's own lr must still reach training as a float,
    and a misspelt setting must stop --compare before any stage runs."""
    from dlma.config import TrainConfig, typed_overrides
    from dlma.pipeline import compare

    cfg = resolve_config(_args("--set", "method_train={rlcd: {lr: 5e-7, epochs: 2}}"))
    assert cfg.method_train["rlcd"]["lr"] == "5e-7"  # what YAML gives
    assert typed_overrides(TrainConfig, cfg.method_train["rlcd"], "method_train.rlcd") == {"lr": 5e-7, "epochs": 2}
    bad = resolve_config(_args("--run-dir", str(tmp_path / "cmp"), "--set", "method_train={rlcd: {lr: fast}}"))
    with pytest.raises(DlmaError, match=r"method_train.rlcd: lr='fast' is not a valid float"):
        compare(bad, ["dlma", "rlcd"], progress=False)
    bad = resolve_config(_args("--run-dir", str(tmp_path / "cmp"), "--set", "method_train={rlcd: {l_r: 1.0e-5}}"))
    with pytest.raises(DlmaError, match="method_train.rlcd: unknown key"):
        compare(bad, ["dlma", "rlcd"], progress=False)
    assert not (tmp_path / "cmp").exists()


def test_print_config_round_trips(tmp_path):
    res = subprocess.run(DLMA + ["run", "--print-config", "--set", "rounds=2"], env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    f = tmp_path / "printed.yaml"
    f.write_text(res.stdout)
    assert resolve_config(_args("--config", str(f))).rounds == 2


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"dlma run ended before {path} appeared"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.1)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_kill_mid_scoring_and_mid_training_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    # the kept training step is chosen on validation prompts (probes at steps 3 and 6, resumed from a checkpoint)
    select = ["--set", "train.select_prompts=safety-val", "--set", "train.select_limit=4", "--set", "train.select_every=3",
              "--set", "sampling.probe_tokens=6"]
    cmd = DLMA + ["run", "--run-dir", str(run_dir), "--no-progress", "--report-to", "tensorboard", *TINY, *select]
    r1 = run_dir / "round-1"

    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(r1 / "score" / "scored.jsonl", proc)
    while _lines(r1 / "score" / "scored.jsonl") < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (r1 / "score" / "done.json").exists(), "the kill should land mid-scoring"

    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(r1 / "train" / "started.json", proc)
    while not list((r1 / "train").glob("model/checkpoints/step-*/*")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (r1 / "train" / "done.json").exists(), "the kill should land mid-training"

    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refusals on harmful prompts" in done.stdout and "index.html" in done.stdout
    assert _lines(r1 / "generate" / "pairs.jsonl") == 10  # 5 harmful + 5 benign prompts
    scored = [json.loads(x)["id"] for x in (r1 / "score" / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 10 and len(set(scored)) == 10
    # the shipped run trains on openings (sampling.response_tokens): scoring made their reference, training took it
    opening = {json.loads(x)["ref_first_tokens"] for x in (r1 / "score" / "scored.jsonl").read_text().splitlines()}
    assert opening == {8}
    trained = json.loads((r1 / "train" / "model" / "train_summary.json").read_text())
    assert trained["reference"] == "from the scored file", trained["reference"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"round-1/generate", "round-1/score", "round-1/train", "round-1/evaluate"} <= set(manifest["stages"])
    assert manifest["versions"]["torch"] and "wall_s" in manifest["stages"]["round-1/train"]
    gen = manifest["stages"]["round-1/generate"]
    assert gen["pairs"] == 10 and gen["pairs_per_s"] > 0 and gen["tokens"] > 0 and gen["tokens_per_s"] > 0
    assert manifest["stages"]["round-1/score"]["pairs_per_s"] > 0 and manifest["stages"]["round-1/train"]["tokens_per_s"]
    assert "round-1/generate" in done.stdout and "pairs/s" in done.stdout and "tokens/s" in done.stdout
    # MFU: each model stage's FLOPs over its wall time, against the matmul peak measured at the start
    assert manifest["machine"]["matmul_peak_flops"] > 1e8 and manifest["machine"]["cpu"]
    for stage in ("generate", "score", "train"):
        assert 0 < manifest["stages"][f"round-1/{stage}"]["mfu"] < 2, manifest["stages"][f"round-1/{stage}"]
    assert "MFU" in done.stdout and "matmul peak" in done.stdout
    kept = json.loads((run_dir / "final-model" / "selection.json").read_text())
    assert [p["step"] for p in kept["probes"]] == [3, 6] and kept["kept_step"] in (3, 6)
    assert f"training step {kept['kept_step']} of 6" in done.stdout
    assert "Training step kept" in (r1 / "evaluate" / "report.md").read_text()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final-model")
    assert model.config.model_type == "llama"
    # the final model's card: the run's evaluation with its split and intervals, and the command
    card = (run_dir / "final-model" / "README.md").read_text()
    assert "## Evaluation" in card and "refusal rate on unsafe prompts" in card and "95% CI" in card
    assert "`safety-test` (2)" in card and "dlma.cli run --run-dir" in card and "(method `dlma`)" in card
    for stage in ("generate", "score", "train", "evaluate"):  # --report-to reached every stage
        assert list((run_dir / "tensorboard" / "round-1" / stage).glob("events.out.tfevents.*")), stage

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stderr.count("skipping") == 4 and "starting" not in again.stderr
    # a skipped stage keeps the MFU of the run that did it, not one against this run's (re-measured) peak
    rerun = json.loads((run_dir / "manifest.json").read_text())
    for stage in ("generate", "score", "train"):
        assert rerun["stages"][f"round-1/{stage}"]["mfu"] == manifest["stages"][f"round-1/{stage}"]["mfu"]
    speed = subprocess.run(cmd + ["--set", "generate.prefix_cache=false"], env=ENV, capture_output=True, text=True, timeout=600)
    assert speed.returncode == 0 and speed.stderr.count("skipping") == 4, "a speed-only setting must not redo stages"

    changed = subprocess.run(cmd + ["--set", "train.beta=0.3"], env=ENV, capture_output=True, text=True, timeout=1200)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "[round 1 generate] done already" in changed.stderr and "[round 1 score] done already" in changed.stderr
    assert "[round 1 train] settings changed" in changed.stderr

    # settings that fail only once training reads its pairs: the trained stage, final-model and the report stay
    trained = json.loads((r1 / "train" / "done.json").read_text())["key"]
    late = subprocess.run(cmd + ["--set", "train.beta=0.3", "--set", "train.min_reward=1e9"], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert late.returncode == 2 and "no pairs left" in late.stderr.strip().splitlines()[-1], late.stderr[-3000:]
    assert json.loads((r1 / "train" / "done.json").read_text())["key"] == trained
    assert (run_dir / "final-model" / "config.json").is_file() and (r1 / "evaluate" / "index.html").is_file()


def test_second_concurrent_run_is_refused(tmp_path):
    from dlma.pipeline import run_lock

    with run_lock(tmp_path):
        res = subprocess.run(DLMA + ["run", "--run-dir", str(tmp_path), "--no-progress"], env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "in use by another dlma run" in res.stderr and "Traceback" not in res.stderr


def test_missing_prompt_file_is_found_before_any_stage(tmp_path):
    res = subprocess.run(DLMA + ["run", "--run-dir", str(tmp_path / "r"), "--no-progress",
                                 "--set", f"generate.prompts={tmp_path / 'nope.jsonl'}", "--set", "generate.preset=harmless"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "generate.prompts" in res.stderr and "nope.jsonl: no such file" in res.stderr and "--prompts FILE" in res.stderr
    assert not (tmp_path / "r").exists()


def test_every_method_can_train_on_what_its_scoring_gives():
    """With the shipped config (min_reward 0), methods without a self-reward train on their pairs."""
    import dataclasses

    from dlma.cli.run import shipped_defaults
    from dlma.objectives import methods
    from dlma.stages import train_config
    from dlma.train import select_pairs

    shipped = shipped_defaults()
    assert shipped.train.min_reward is not None  # what makes this a test
    for method, spec in methods().items():
        pair = {"id": "a", "chosen": "x", "rejected": "y"}
        if spec.judge in ("self-reward", "both"):
            pair["self_reward"] = 1.0
        if spec.judge in ("text", "both"):
            pair["judge_score"] = 0.25
        tcfg = train_config(dataclasses.replace(shipped, method=method))
        assert tcfg.loss == spec.loss
        assert (tcfg.min_reward is not None) == spec.selects_by_reward, method  # only methods that use R filter by it
        kept, _ = select_pairs([pair], tcfg)
        assert len(kept) == 1, method
    assert train_config(shipped).min_reward == shipped.train.min_reward  # dlma keeps its filter
    assert train_config(dataclasses.replace(shipped, method="rlcd")).min_reward is None  # RLCD: the pairs as they come
    assert shipped.train.kl_alpha > 0  # the KL term: kept by every loss over sampled responses, dropped by SFT's
    kept_kl = {m: train_config(dataclasses.replace(shipped, method=m)).kl_alpha for m in methods()}
    assert kept_kl["dlma-listwise"] == kept_kl["dlma"] == shipped.train.kl_alpha and kept_kl["context-distillation"] == 0.0


def test_rlaif_orientation_moves_every_per_side_field(tmp_path):
    """A pair the text judge prefers the other way is flipped whole: a reference or token count left
    on the wrong side would train DPO against the wrong baseline."""
    from dlma.pipeline import _orient

    pair = {"id": "a", "chosen": "x", "rejected": "y", "chosen_truncated": True, "ref_lp_chosen": -1.0,
            "ref_lp_rejected": -2.0, "ref_lp_chosen_first": -0.5, "ref_lp_rejected_first": -0.25, "ref_first_tokens": 8,
            "lp_chosen_pos": -3.0, "lp_rejected_neg": -4.0, "chosen_tokens": 5, "rejected_tokens": 7, "self_reward": 1.5}
    src = tmp_path / "scored.jsonl"
    src.write_text("\n".join(json.dumps(dict(pair, id=i, judge_score=s)) for i, s in (("keep", 0.1), ("flip", -0.1), ("none", None))))
    assert _orient(src, tmp_path / "oriented.jsonl", "judge_score") == {"pairs": 2, "flipped_by_judge": 1}
    kept, flipped = [json.loads(line) for line in (tmp_path / "oriented.jsonl").read_text().splitlines()]
    assert {k: v for k, v in kept.items() if k != "judge_score"} == dict(pair, id="keep")
    assert flipped["chosen"] == "y" and flipped["rejected"] == "x" and flipped["rejected_truncated"] is True
    assert "chosen_truncated" not in flipped and flipped["self_reward"] == -1.5 and flipped["ref_first_tokens"] == 8
    assert (flipped["ref_lp_chosen"], flipped["ref_lp_rejected"]) == (-2.0, -1.0)
    assert (flipped["ref_lp_chosen_first"], flipped["ref_lp_rejected_first"]) == (-0.25, -0.5)
    assert (flipped["lp_rejected_pos"], flipped["lp_chosen_neg"]) == (-3.0, -4.0)
    assert (flipped["chosen_tokens"], flipped["rejected_tokens"]) == (7, 5)


@pytest.mark.slow
def test_compare_puts_methods_side_by_side(tmp_path):
    from dlma.objectives import methods as registered

    METHODS = registered()
    run_dir = tmp_path / "cmp"
    # every method that runs with the shipped config (listwise needs best-of-K generation)
    methods = [m for m, spec in METHODS.items() if spec.loss != "listwise"]
    res = subprocess.run(DLMA + ["run", "--run-dir", str(run_dir), "--compare", ",".join(methods), "--no-progress", *TINY,
                                 "--set", "train.max_steps=2", "--set", "seeds=[0,1]",
                                 "--set", "method_train={rlcd: {lr: 3.0e-6}}"], env=ENV, capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, res.stderr[-3000:]
    for m in methods:
        for seed in (0, 1):
            assert (run_dir / m / f"seed-{seed}" / "final-model" / "config.json").is_file()
    # every run after the first reuses the identical generation instead of redoing it
    assert res.stderr.count("[round 1 generate] identical stage found in a sibling run") == 2 * len(methods) - 1
    # the untouched model answers once; every other run copies its answers
    made = [json.loads((run_dir / m / f"seed-{seed}" / "round-1" / "evaluate" / "metrics.json").read_text())
            ["prompts"]["answers_generated"]["baseline"] for m in methods for seed in (0, 1)]
    assert made[0] == 2 and not any(made[1:])
    # so do the untouched answers the KL term holds (the pair losses carry it; SFT has no pairs)
    kl_runs = [m for m in methods if METHODS[m].loss in ("dlma", "dpo")]
    assert res.stderr.count("[round 1 train] the KL term's untouched answers copied from") == 2 * len(kl_runs) - 1
    rlcd = json.loads((run_dir / "rlcd" / "seed-1" / "round-1" / "train" / "model" / "train_summary.json").read_text())
    assert rlcd["resume_key"]["train"]["lr"] == 3.0e-6 and rlcd["resume_key"]["train"]["seed"] == 1  # its own lr, the seed
    spread = json.loads((run_dir / "compare.json").read_text())
    assert spread["dlma"]["seeds"] == [0, 1] and "sd" in spread["dlma"]["aligned_refusal_unsafe"]
    assert "balanced (difference)" in res.stdout and "(sd " in res.stdout
    html = (run_dir / "report" / "index.html").read_text()
    assert all(m in html for m in methods)


def test_listwise_method_needs_best_of_k_generation(tmp_path):
    import dataclasses

    from dlma.cli.run import shipped_defaults
    from dlma.pipeline import Pipeline

    cfg = dataclasses.replace(shipped_defaults(), method="dlma-listwise")
    with pytest.raises(DlmaError, match="generate.num_samples"):
        Pipeline(cfg, tmp_path / "run", progress=False)
    cfg = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, num_samples=2))
    assert Pipeline(cfg, tmp_path / "run", progress=False).cfg.method == "dlma-listwise"


def test_train_defaults_are_the_run_defaults():
    """`dlma train` by hand has the run's lr and clipping (TrainConfig's, not the YAML's); its terms and
    interpolation are the recipe's with `--recipe safety` (tests/test_recipes.py), the paper's loss alone without."""
    from importlib import resources

    import yaml

    from dlma.cli.run import shipped_defaults
    from dlma.config import TrainConfig, config_from_args

    shipped = shipped_defaults().train
    by_hand = config_from_args(TrainConfig, build_parser().parse_args(["train", "--data", "x", "--out", "y"]))
    for name, value in (("lr", 7e-5), ("max_grad_norm", 0.0)):
        assert getattr(TrainConfig(), name) == getattr(by_hand, name) == getattr(shipped, name) == value, name
    yaml_train = yaml.safe_load(resources.files("dlma.configs").joinpath("default.yaml").read_text())["train"]
    assert not {"lr", "max_grad_norm"} & set(yaml_train)
    assert TrainConfig().rpo_alpha == by_hand.rpo_alpha == 0.0  # by hand: the paper's loss alone
    assert (shipped.rpo_alpha, shipped.rpo_roles) == (0.2, ["retain"])
    assert TrainConfig().kl_alpha == by_hand.kl_alpha == 0.0 and (shipped.kl_alpha, shipped.kl_roles) == (1.0, ["retain"])
    assert TrainConfig().interpolate == by_hand.interpolate == 1.0 and shipped.interpolate == 0.75  # by hand: as trained


def test_shipped_run_config_names_the_presets_it_trains_on():
    """The default run's NLL and KL terms reach presets its generate stage uses, through the role they declare."""
    from dlma.cli.run import shipped_defaults
    from dlma.prompts import load_preset
    from dlma.terms import preset_roles, role_terms

    cfg = shipped_defaults()
    presets = cfg.generate.preset.split(",")
    tcfg, notes = role_terms(cfg.train, preset_roles(presets))
    assert not notes and tcfg.rpo_alpha > 0 and tcfg.kl_alpha > 0 and tcfg.rpo_presets == tcfg.kl_presets == ["no-overrefusal"]
    assert all(load_preset(p).name == p for p in presets + ["no-overrefusal-bare"])
    assert load_preset("no-overrefusal-bare").role == "retain" and load_preset("harmless").role == "attribute"


def test_stage_keys_follow_file_contents_and_local_model_directories(tmp_path, monkeypatch):
    """An edited prompt file, preset or a local model directory retrained in place redoes the stages, not `done already`;
    an edited detector redoes the evaluation alone."""
    import dataclasses

    from dlma.cli.run import shipped_defaults
    from dlma.pipeline import Pipeline

    prompts, model_dir, preset = tmp_path / "prompts.jsonl", tmp_path / "model", tmp_path / "mine.yaml"
    prompts.write_text('{"prompt": "How do I bake bread?"}\n')
    preset.write_text("name: mine\npositive: {instruction: Be brief.}\nnegative: {instruction: Ramble.}\ndetector: {max_words: 30}\n")
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights v1")

    def keys() -> dict:
        seen = {}

        def stage(self, name, rnd, key, fn):
            seen[name] = key
            if name == "evaluate":
                d = self.dir / f"round-{rnd}" / "evaluate"
                d.mkdir(parents=True, exist_ok=True)
                (d / "metrics.json").write_text("{}")
            return {}

        monkeypatch.setattr(Pipeline, "_stage", stage)
        cfg = shipped_defaults()
        cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"), model=dataclasses.replace(cfg.model, model=str(model_dir)),
                                  generate=dataclasses.replace(cfg.generate, prompts=str(prompts), preset=str(preset)),
                                  evaluate=dataclasses.replace(cfg.evaluate, prompts=str(prompts)))
        Pipeline(cfg, progress=False, log=lambda m: None).run()
        return seen

    first = keys()
    assert keys() == first  # nothing changed: every stage would be skipped
    prompts.write_text('{"prompt": "How do I bake rye bread?"}\n')
    edited = keys()
    assert all(edited[s] != first[s] for s in first), (first, edited)
    (model_dir / "model.safetensors").write_bytes(b"weights v2, retrained")
    retrained = keys()
    assert all(retrained[s] != edited[s] for s in first)
    # how the attribute is measured is read by evaluation alone: only it redoes
    preset.write_text(preset.read_text().replace("max_words: 30", "max_words: 20"))
    measured = keys()
    assert [s for s in first if measured[s] != retrained[s]] == ["evaluate"]
    preset.write_text(preset.read_text().replace("Be brief.", "Be very brief."))
    assert all(keys()[s] != measured[s] for s in first)


def _pipeline(tmp_path, logs: list):
    import dataclasses

    from dlma.cli.run import shipped_defaults
    from dlma.pipeline import Pipeline

    return Pipeline(dataclasses.replace(shipped_defaults(), run_dir=str(tmp_path / "run")), progress=False, log=logs.append)


def _trains(version: str, fail: bool = False):
    def fn(d: Path) -> dict:
        (d / "model").mkdir(parents=True, exist_ok=True)
        (d / "model" / "weights").write_text(version)
        if fail:
            raise DlmaError("no pairs left to train on")
        return {"version": version}
    return fn


def test_a_rerun_whose_settings_fail_keeps_the_old_result(tmp_path):
    """A finished stage rerun with settings that fail late (train.min_reward above every pair's R) was
    deleted before they were checked: final-model dangled beside a stale report. The new stage runs
    beside the old one (STAGE.new) and replaces it only once complete."""
    logs: list = []
    pipe = _pipeline(tmp_path, logs)
    train, final = tmp_path / "run" / "round-1" / "train", tmp_path / "run" / "final-model" / "weights"
    assert pipe._stage("train", 1, "old", _trains("old")) == {"version": "old"}
    pipe._link_final(str(train / "model"))
    with pytest.raises(DlmaError, match="stage round 1 train: no pairs left"):
        pipe._stage("train", 1, "new", _trains("new", fail=True))
    assert final.read_text() == "old" and json.loads((train / "done.json").read_text())["key"] == "old"
    assert any("settings changed: redoing it beside the old result" in m for m in logs)
    assert pipe._stage("train", 1, "new", _trains("new")) == {"version": "new"}  # resumed beside, then swapped in
    assert final.read_text() == "new" and not train.with_name("train.new").exists() and not train.with_name("train.old").exists()
    assert pipe._stage("train", 1, "new", _trains("other", fail=True)) == {"version": "new"}  # done: skipped
    # a kill between the swap's two renames: the next run puts the finished new stage in place
    pipe._stage("train", 1, "newer", _trains("newer"))
    os.replace(train, train.with_name("train.new"))
    assert pipe._stage("train", 1, "newer", _trains("x", fail=True)) == {"version": "newer"} and final.read_text() == "newer"


def test_corrupt_markers_count_as_absent(tmp_path, monkeypatch):
    """A corrupt done.json, started.json or manifest.json was a JSONDecodeError traceback."""
    from dlma.pipeline import Pipeline

    logs: list = []
    pipe = _pipeline(tmp_path, logs)
    train = tmp_path / "run" / "round-1" / "train"
    pipe._stage("train", 1, "k", _trains("one"))
    (train / "done.json").write_text('{"key": "k", "summ')  # cut short
    assert pipe._stage("train", 1, "k", _trains("two")) == {"version": "two"} and logs[-1] == "[round 1 train] resuming"
    (train / "started.json").write_text("[1, 2]")
    (train / "done.json").unlink()
    assert pipe._stage("train", 1, "k", _trains("three")) == {"version": "three"}
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    monkeypatch.setattr(Pipeline, "_round", lambda self, rnd, spec, policy, upstream: (policy, upstream, {"round": rnd}))
    monkeypatch.setattr(Pipeline, "_link_final", lambda self, policy: None)
    assert pipe.run() == {"round": 1}
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["method"] == "dlma"
