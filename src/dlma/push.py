"""`dlma push`: publish a trained model (or LoRA adapter) and its pairs on the Hugging Face Hub.

The model repository gets the saved model without dlma's bookkeeping (summaries, metrics,
cached reference log-probs, checkpoints, tracker logs) and a model card that names the pair
dataset; the dataset repository gets the pairs the model was trained on, in TRL's
conversational preference format (`data/train.jsonl`), with a card of its own. Each is one
commit through `huggingface_hub` (`HfApi` unless a client is passed in: tests use their own).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .card import CARD, dataset_card, facts, render
from .data import read_pairs
from .errors import DlmaError
from .pairfile import conversational
from .tracking import LOGGING_DIR

# What a dlma model directory holds besides the model: kept out of the upload.
BOOKKEEPING = frozenset({"train_summary.json", "metrics.jsonl", "reference_logprobs.json", "kl_reference.pt",
                         "selection.json", "selected-weights.pt", CARD})
BOOKKEEPING_DIRS = frozenset({"checkpoints", LOGGING_DIR})


class HubClient(Protocol):
    """The part of `huggingface_hub.HfApi` that pushing uses."""

    def create_repo(self, repo_id: str, *, repo_type: str | None = None, private: bool | None = None,
                    exist_ok: bool = False) -> Any: ...

    def create_commit(self, repo_id: str, operations: Any, *, commit_message: str, repo_type: str | None = None) -> Any: ...


@dataclass
class Published:
    model_dir: Path
    pairs: Path | None
    run_dir: Path | None  # a `dlma run` directory (its card has the evaluation)


def locate(run_dir: str | Path) -> Published:
    """The model and pair file of a `dlma run` directory (final-model/) or a `dlma train` output."""
    run_dir = Path(run_dir)
    if (run_dir / "final-model" / "train_summary.json").is_file():
        model_dir, run = (run_dir / "final-model").resolve(), run_dir
    elif (run_dir / "train_summary.json").is_file():
        model_dir, run = run_dir, None
    else:
        raise DlmaError(f"{run_dir} is neither a finished `dlma run` directory (final-model/) nor a `dlma train` --out "
                        "(train_summary.json); push one of those")
    data = (json.loads((model_dir / "train_summary.json").read_text()).get("resume_key") or {}).get("data")
    return Published(model_dir, Path(data) if data and Path(data).is_file() else None, run)


def model_files(model_dir: Path) -> list[Path]:
    """The files of the saved model itself, relative to model_dir."""
    out = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if path.is_file() and rel.parts[0] not in BOOKKEEPING_DIRS and rel.name not in BOOKKEEPING \
                and not rel.name.startswith("."):
            out.append(rel)
    return out


def push(run_dir: str | Path, repo: str, *, dataset_repo: str | None = None, pairs: bool = True,
         private: bool = False, client: HubClient | None = None) -> dict:
    """Upload the model (repo) and, with `pairs`, its pair data (dataset_repo, default REPO-pairs).
    Returns the repositories written. Hub and network errors are one-line DlmaErrors."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    pub = locate(run_dir)
    if pairs and pub.pairs is None:
        raise DlmaError(f"{pub.model_dir}: the pair file it was trained on is gone; push with --no-pairs, or restore it")
    dataset_repo = (dataset_repo or f"{repo}-pairs") if pairs else None
    card = render(facts(pub.model_dir, pub.run_dir, dataset_repo)).encode()
    model_ops = [CommitOperationAdd(str(rel), str(pub.model_dir / rel)) for rel in model_files(pub.model_dir)]
    model_ops.append(CommitOperationAdd(CARD, card))
    client = client or HfApi()
    try:
        client.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        client.create_commit(repo, model_ops, commit_message="Upload model aligned with dlma", repo_type="model")
        if dataset_repo:
            records = read_pairs(str(pub.pairs))
            lines = "".join(json.dumps(conversational(r), ensure_ascii=False) + "\n" for r in records).encode()
            client.create_repo(dataset_repo, repo_type="dataset", private=private, exist_ok=True)
            client.create_commit(dataset_repo, [CommitOperationAdd("data/train.jsonl", lines),
                                                CommitOperationAdd(CARD, dataset_card(records, repo).encode())],
                                 commit_message="Upload dlma pairs", repo_type="dataset")
    except (HfHubHTTPError, OSError) as exc:
        raise DlmaError(f"pushing to {repo} failed: {' '.join(str(exc).split())[:300]} (log in with `hf auth login` "
                        "or set HF_TOKEN; unset HF_HUB_OFFLINE to reach the Hub)") from None
    return {"model": repo, "dataset": dataset_repo, "files": len(model_ops)}
