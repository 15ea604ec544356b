"""Model cards in saved models, and `dlma push` to the Hub (an injected client; the real one up to the network)."""

from __future__ import annotations


import pytest

datasets = pytest.importorskip("datasets")


class Recorder:
    """A Hub client that keeps what it is sent: repositories made and each commit's files (as bytes)."""

    def __init__(self):
        self.repos: list[tuple[str, str, bool]] = []
        self.files: dict[str, dict[str, bytes]] = {}

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False):
        self.repos.append((repo_id, repo_type, private))

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None):
        store = self.files.setdefault(repo_id, {})
        for op in operations:
            src = op.path_or_fileobj
            store[op.path_in_repo] = src if isinstance(src, bytes) else open(src, "rb").read()


def test_saved_model_has_a_card_a_reader_understands(trained):
    from huggingface_hub import ModelCard

    _, model_dir = trained
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.library_name == "transformers"
    text = card.text
    for needed in ("aligned with DLMA", "| loss | `dlma` |", "| beta | 0.1 |", "| self-reward weight w | 0.2 |",
                   "R quantiles", "contrast of `harmless` pairs", "6 pairs read, 6 trained on", "## Reproduce"):
        assert needed in text, needed
    assert "## Evaluation" not in text  # `dlma train` alone has none; `dlma run` adds its table


def test_push_uploads_the_model_and_the_pairs_as_a_dataset(trained, tmp_path):
    from dlma.push import push

    scored, model_dir = trained
    hub = Recorder()
    assert push(model_dir, "me/tiny-dlma", client=hub, private=True)["dataset"] == "me/tiny-dlma-pairs"
    assert hub.repos == [("me/tiny-dlma", "model", True), ("me/tiny-dlma-pairs", "dataset", True)]
    model = hub.files["me/tiny-dlma"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(model)
    assert not {"train_summary.json", "metrics.jsonl"} & set(model) and not any(p.startswith("tensorboard/") for p in model)
    assert b"datasets:\n- me/tiny-dlma-pairs" in model["README.md"]
    pairs = hub.files["me/tiny-dlma-pairs"]
    assert b"path: data/train.jsonl" in pairs["README.md"] and b"me/tiny-dlma" in pairs["README.md"]
    (tmp_path / "train.jsonl").write_bytes(pairs["data/train.jsonl"])
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "train.jsonl"), split="train")
    assert len(ds) == 6 and ds[0]["chosen"][0]["role"] == "assistant" and "self_reward" in ds.column_names


def test_push_through_the_real_client_stops_only_at_the_network(trained, monkeypatch, capsys):
    """HfApi itself runs up to its HTTP request, which offline mode (set for the tests) refuses: one line, no traceback."""
    from dlma.cli import main

    _, model_dir = trained
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert main(["push", str(model_dir), "me/tiny-dlma"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pushing to me/tiny-dlma failed" in err and "api/repos/create" in err


def test_push_refuses_what_is_not_a_trained_model(tmp_path):
    from dlma.errors import DlmaError
    from dlma.push import push

    with pytest.raises(DlmaError, match="neither a finished `dlma run` directory"):
        push(tmp_path, "me/x", client=Recorder())
