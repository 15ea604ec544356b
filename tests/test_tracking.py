"""--report-to: every stage writes TensorBoard events (read back here) with its name and typed settings."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("tensorboard")


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _hparams(logdir) -> dict:
    """The settings accelerate's TensorBoard tracker stored beside the run (hparams.yml)."""
    (found,) = list(logdir.glob("*/hparams.yml"))
    return yaml.safe_load(found.read_text())


def test_score_reports_r_histogram_quantiles_and_contrast(trained):
    scored, _ = trained
    logdir = scored.parent / "tensorboard" / "score-scored"
    acc = _events(logdir)
    assert "score/self_reward" in acc.Tags()["histograms"]
    hist = acc.Histograms("score/self_reward")[0]
    assert hist.step == 6 and hist.histogram_value.num == 6  # one value per pair of the file
    scalars = acc.Tags()["scalars"]
    for tag in ("score/self_reward_median", "score/self_reward_p10", "score/self_reward_positive", "score/contrast/harmless"):
        assert tag in scalars, scalars
    lo, hi = acc.Scalars("score/self_reward_min")[0].value, acc.Scalars("score/self_reward_max")[0].value
    assert lo <= acc.Scalars("score/self_reward_median")[0].value <= hi
    settings = _hparams(logdir)
    assert settings["score.batch_size"] == 4 and settings["model.dtype"] == "float32"  # typed, not strings
    assert settings["sampling.max_context"] == 1024 and settings["sampling.response_tokens"] == "none"


def test_train_reports_every_step_under_the_run_name_with_typed_settings(trained):
    _, model_dir = trained
    logdir = model_dir / "tensorboard" / "train-model"
    acc = _events(logdir)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert {"lr", "reward_margin", "tokens_per_s"} <= set(acc.Tags()["scalars"])
    settings = _hparams(logdir)
    assert settings["train.beta"] == 0.1 and settings["train.max_steps"] == 2 and settings["train.loss"] == "dlma"
    assert settings["train.margin_clip"] == "[-40.0, 40.0]"


def test_generate_and_evaluate_report_throughput_and_tables(embedded, tmp_path):
    from dlma.config import EvalConfig, GenerateConfig, ModelConfig, SamplingConfig
    from dlma.evaluate import evaluate_models
    from dlma.generate import TransformersBackend, generate_pairs

    model, tok = embedded
    out = tmp_path / "pairs.jsonl"
    generate_pairs(ModelConfig(dtype="float32"), GenerateConfig(limit=2, batch_size=4, report_to=["tensorboard"]),
                   str(out), sampling=SamplingConfig(max_new_tokens=6), backend=TransformersBackend(model, tok, 4), tokenizer=tok, progress=False)
    acc = _events(tmp_path / "tensorboard" / "generate-pairs")
    assert acc.Scalars("generate/pairs_per_s")[-1].value > 0 and acc.Scalars("generate/pairs_written")[-1].value == 2

    evaluate_models(ModelConfig(device="cpu", dtype="float32"),
                    EvalConfig(prompts="safety-eval", limit=2, judge=[], report_to=["tensorboard", "none"]),
                    str(tmp_path / "eval"), model="embedded", baseline="embedded", sampling=SamplingConfig(answer_tokens=4), progress=False,
                    preloaded={"embedded": embedded})
    acc = _events(tmp_path / "eval" / "tensorboard" / "evaluate-eval")
    for role in ("aligned", "baseline"):
        assert 0 <= acc.Scalars(f"evaluate/{role}/refusal_rate")[0].value <= 1
        assert f"evaluate/{role}/refusal_rate_high" in acc.Tags()["scalars"]
    table = acc.Tensors("evaluate/refusal_and_quality/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "refusal rate on unsafe prompts" in table and "| aligned | baseline |" in table


def test_unknown_tracker_is_one_line_error():
    from dlma.errors import DlmaError
    from dlma.tracking import installed

    with pytest.raises(DlmaError, match="unknown tracker 'tensorbord'; choose tensorboard, wandb or none"):
        installed(["tensorbord"])
