"""How a pair is stored on disk: TRL's conversational preference format.

A pair file line holds `prompt`, `chosen` and `rejected` as chat-message lists (the prompt's
turns; one assistant message each for the answers), so `datasets.load_dataset("json", ...)`
reads it and TRL's DPOTrainer trains on it as it is; dlma's own fields (ids, preset,
self_reward, reference log-probs, truncation flags, generation settings) ride along as extra
columns. In memory dlma keeps each answer as its text: `conversational` makes the stored form
and `answer_text` reads either form back, so the texts, hence the token ids, are the same.

Older dlma files held the answers as plain strings beside a message-list prompt, which is
neither of TRL's conventions; they are still read, with a one-line notice, and a resumed
output in that form is rewritten in this one before anything is appended.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ANSWERS = ("chosen", "rejected")
_NOTIFIED: set[str] = set()


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def conversational(record: dict) -> dict:
    """The stored form of an in-memory pair: each answer as a one-message assistant turn."""
    out = dict(record)
    for key in ANSWERS:
        if isinstance(out.get(key), str):
            out[key] = [{"role": "assistant", "content": out[key]}]
    return out


def answer_text(value: Any) -> str | None:
    """An answer's text from either form (None where it is neither a string nor messages ending
    with an assistant turn)."""
    if isinstance(value, str):
        return value
    if is_messages(value) and value and value[-1]["role"] == "assistant" and isinstance(value[-1]["content"], str):
        return value[-1]["content"]
    return None


def implicit_prompt(record: dict) -> list[dict]:
    """The turns before the answer that both message-list answers share (TRL's implicit-prompt
    form keeps the whole conversation in chosen/rejected); [] where there are none."""
    c, r = record.get("chosen"), record.get("rejected")
    if not (is_messages(c) and is_messages(r)) or len(c) < 2 or c[:-1] != r[:-1]:
        return []
    return [dict(m) for m in c[:-1]]


def is_legacy(record: dict) -> bool:
    """dlma's older form: a message-list prompt with plain-string answers."""
    return is_messages(record.get("prompt")) and all(isinstance(record.get(k), str) for k in ANSWERS)


def notice_legacy(path: str | Path) -> None:
    """Say once per file that it is in the older form (read as is)."""
    key = str(Path(path).resolve())
    if key not in _NOTIFIED:
        _NOTIFIED.add(key)
        print(f"dlma: {path} holds pairs in dlma's older format (answers as plain strings); read as is. "
              "New files store prompt, chosen and rejected as chat messages (TRL's conversational format)",
              file=sys.stderr)


def upgrade_before_append(writer) -> None:
    """An older dlma's partial output, already checked against the inputs, rewritten in the stored form
    before the writer appends to it (the writer then appends to the rewritten file)."""
    if upgrade(writer.path):
        writer.reopen()


def upgrade(path: str | Path) -> int:
    """Rewrite an existing older-form pair file in the stored form before output is appended to
    it (same records, same order); returns the records rewritten (0 when none needed it)."""
    from .data import replacing

    path = Path(path)
    if not path.is_file():
        return 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        records = [json.loads(line) for line in lines if line.strip() and line.endswith("\n")]
    except (UnicodeDecodeError, json.JSONDecodeError):
        return 0  # not a pair file this can read: the writer that opens it next says what is wrong
    if not any(isinstance(r, dict) and is_legacy(r) for r in records):
        return 0
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(conversational(rec), ensure_ascii=False) + "\n")
    return len(records)

