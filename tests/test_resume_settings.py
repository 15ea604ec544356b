"""A rerun into an existing output resumes it only with the settings that made it."""

from __future__ import annotations

import json

import pytest

from dlma.config import GenerateConfig, ModelConfig, SamplingConfig, ScoreConfig
from dlma.errors import DlmaError


def test_generate_refuses_to_append_with_other_settings(tmp_path, embedded):
    from dlma.generate import TransformersBackend, generate_pairs

    model, tok = embedded
    out = tmp_path / "pairs.jsonl"
    run = lambda sampling=None, **kw: generate_pairs(  # noqa: E731
        ModelConfig(dtype="float32"), GenerateConfig(**{"limit": 1, **kw}), str(out),
        sampling=SamplingConfig(**{"max_new_tokens": 2, **(sampling or {})}), backend=TransformersBackend(model, tok, 4),
        tokenizer=tok, progress=False)
    run()
    before = out.read_text()
    for kw, named in (({"sampling": {"temperature": 1.0}}, "temperature: 0.7 there, 1.0 now"), ({"preset": "helpful"}, "preset"),
                      ({"sampling": {"max_new_tokens": 3}}, "max_new_tokens"), ({"num_pairs": 2}, "num_pairs")):
        with pytest.raises(DlmaError, match=f"holds 1 records made with other settings.*{named}"):
            run(**kw)
        assert out.read_text() == before
    assert run(limit=2, batch_size=2)["pairs_written"] == 1  # more prompts, same settings: resumed


def test_score_refuses_to_append_with_other_settings(tmp_path, embedded):
    from dlma.reward import score_file

    model, tok = embedded
    data, out = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n"
                            for i in ("a", "b")))
    run = lambda cfg: score_file(ModelConfig(dtype="float32"), cfg, str(data), str(out), model=model, tokenizer=tok,  # noqa: E731
                                 progress=False)
    run(ScoreConfig(limit=1))
    before = out.read_text()
    for cfg in (ScoreConfig(judge="text"), ScoreConfig(preset="helpful"), ScoreConfig(reference=False)):
        with pytest.raises(DlmaError, match="other settings"):
            run(cfg)
        assert out.read_text() == before
    assert run(ScoreConfig(batch_size=2))["scored"] == 1  # the batch size does not change the records


def test_an_edited_preset_file_is_other_settings(tmp_path, embedded):
    """A preset file is keyed by its content, not its path: edited between two runs into one output,
    the second run's pairs would be another preset's under the same name."""
    from pathlib import Path

    from dlma.generate import TransformersBackend, generate_pairs

    model, tok = embedded
    preset = tmp_path / "mine.yaml"
    preset.write_text((Path(__file__).parents[1] / "src/dlma/presets/harmless.yaml").read_text())
    out = tmp_path / "pairs.jsonl"
    run = lambda limit: generate_pairs(ModelConfig(dtype="float32"),  # noqa: E731
                                       GenerateConfig(preset=str(preset), limit=limit), str(out),
                                       sampling=SamplingConfig(max_new_tokens=2), backend=TransformersBackend(model, tok, 4), tokenizer=tok, progress=False)
    run(1)
    preset.write_text(preset.read_text().replace("You politely refuse", "You always refuse"))
    with pytest.raises(DlmaError, match="other settings .*preset_files"):
        run(2)
