"""Shared fixtures: the real embedded model (float32, loaded once) and a tiny pair file."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (-n N) the workers share the cores: each takes its share of threads (and so do the
# processes its tests start), instead of every worker's torch taking them all.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M in float32, eval mode."""
    from dlma.models import load_model

    return load_model("embedded", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(embedded):
    return embedded[1]


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory, embedded):
    """Six contrastive pairs from the bundled HH prompts, 24 new tokens each (float32)."""
    from dlma.config import GenerateConfig, ModelConfig, SamplingConfig
    from dlma.generate import TransformersBackend, generate_pairs

    model, tok = embedded
    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    generate_pairs(ModelConfig(dtype="float32"), GenerateConfig(limit=6, batch_size=12), str(out),
                   sampling=SamplingConfig(max_new_tokens=24), backend=TransformersBackend(model, tok, 12), tokenizer=tok, progress=False)
    return out


@pytest.fixture(scope="session")
def trained(tiny_pairs, embedded, tmp_path_factory):
    """The tiny pairs scored and trained for two steps by dlma's own stages, both reporting to TensorBoard:
    (scored file, model directory)."""
    from dlma.config import ModelConfig, ScoreConfig, TrainConfig
    from dlma.reward import score_file
    from dlma.train import train_model

    model, tok = embedded
    d = tmp_path_factory.mktemp("trained")
    scored = d / "scored.jsonl"
    score_file(ModelConfig(dtype="float32"), ScoreConfig(batch_size=4, report_to=["tensorboard"]), str(tiny_pairs),
               str(scored), model=model, tokenizer=tok, progress=False)
    train_model(ModelConfig(dtype="float32", device="cpu"),
                TrainConfig(max_steps=2, batch_size=2, save_steps=0, report_to=["tensorboard"]), str(scored),
                str(d / "model"), progress=False)
    return scored, d / "model"
