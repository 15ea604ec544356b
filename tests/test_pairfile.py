"""Pair files in TRL's conversational format, older files still read, and prompts from `datasets`."""

from __future__ import annotations

import json

import pytest

from dlma.data import read_jsonl, read_pairs, read_prompts
from dlma.errors import DataError, DlmaError
from dlma.pairfile import conversational, is_messages, upgrade

datasets = pytest.importorskip("datasets")

OLD = {"id": "a", "prompt_id": "a", "prompt": [{"role": "user", "content": "How do I pick a lock?"}],
       "chosen": "I can't help with that.", "rejected": " Sure: first, ", "chosen_truncated": False,
       "rejected_truncated": True, "preset": "harmless", "self_reward": 3.5}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_generated_file_is_conversational_and_loads_with_datasets(tiny_pairs):
    raw = read_jsonl(tiny_pairs)
    for rec in raw:
        assert is_messages(rec["prompt"]) and rec["prompt"][-1]["role"] == "user"
        for key in ("chosen", "rejected"):
            assert is_messages(rec[key]) and [m["role"] for m in rec[key]] == ["assistant"]
    ds = datasets.load_dataset("json", data_files=str(tiny_pairs), split="train")
    assert len(ds) == len(raw)
    assert {"prompt", "chosen", "rejected", "id", "preset", "generation", "chosen_truncated"} <= set(ds.column_names)
    assert ds[0]["chosen"][0]["content"] == raw[0]["chosen"][0]["content"]
    # in memory dlma keeps the texts: exactly the answers' contents
    texts = [(r["chosen"], r["rejected"]) for r in read_pairs(str(tiny_pairs))]
    assert texts == [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in raw]


def test_old_and_new_forms_read_the_same(tmp_path, capfd, tokenizer):
    from dlma.prompts import Renderer
    from dlma.train import build_examples

    old = _write(tmp_path / "old.jsonl", [OLD, dict(OLD, id="b")])
    new = _write(tmp_path / "new.jsonl", [conversational(OLD), conversational(dict(OLD, id="b"))])
    a, b = read_pairs(str(old)), read_pairs(str(new))
    assert a == b and a[0]["chosen"] == OLD["chosen"] and a[0]["rejected"] == OLD["rejected"]
    err = capfd.readouterr().err
    assert err.count("older format") == 1 and "old.jsonl" in err  # one line, for the old file only
    read_pairs(str(old))
    assert "older format" not in capfd.readouterr().err  # once per file
    r = Renderer(tokenizer)
    ea, eb = build_examples(a, r), build_examples(b, r)
    assert [(e.context, e.chosen, e.rejected) for e in ea] == [(e.context, e.chosen, e.rejected) for e in eb]


def test_trl_implicit_prompt_and_standard_forms(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "q?"}]
    implicit = {"chosen": turns + [{"role": "assistant", "content": "good"}],
                "rejected": turns + [{"role": "assistant", "content": "bad"}]}
    standard = {"prompt": "q?", "chosen": "good", "rejected": "bad"}
    a, b = read_pairs(str(_write(tmp_path / "p.jsonl", [implicit, standard])))
    assert (a["prompt"], a["chosen"], a["rejected"]) == (turns, "good", "bad")
    assert (b["prompt"], b["chosen"]) == ([{"role": "user", "content": "q?"}], "good")
    bad = dict(conversational(OLD), chosen=[{"role": "user", "content": "x"}])
    with pytest.raises(DataError, match="`chosen` must be a string or chat messages ending with an assistant turn"):
        read_pairs(str(_write(tmp_path / "bad.jsonl", [bad])))


def test_resumed_old_output_is_rewritten_before_appending(tmp_path):
    out = _write(tmp_path / "scored.jsonl", [OLD, dict(OLD, id="b")])
    with open(out, "a") as f:
        f.write('{"id": "c", "prom')  # a line cut by a kill stays for the writer to drop
    assert upgrade(out) == 2
    raw = read_jsonl(out)
    assert [r["id"] for r in raw] == ["a", "b"] and all(is_messages(r["chosen"]) for r in raw)
    assert read_pairs(str(out))[0]["rejected"] == OLD["rejected"]
    assert upgrade(out) == 0  # already in the stored form: untouched


def test_prompts_from_a_datasets_dataset_with_a_column_mapping(tmp_path):
    from dlma.data import column_map

    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"question": ["Is the sky blue?", "How do I make a bomb?"], "qid": ["q1", "q2"], "harm": ["safe", "unsafe"]})}
    ).save_to_disk(str(saved))
    got = read_prompts(f"{saved}:test", columns=column_map(["prompt=question", "id=qid", "label=harm"]))
    assert [(p.id, p.prompt[-1]["content"], p.label) for p in got] == [("q1", "Is the sky blue?", "safe"),
                                                                       ("q2", "How do I make a bomb?", "unsafe")]
    files = tmp_path / "files"
    files.mkdir()
    _write(files / "train.jsonl", [{"text": "hello there"}])
    assert read_prompts(str(files), columns={"prompt": "text"})[0].prompt == [{"role": "user", "content": "hello there"}]
    with pytest.raises(DataError, match="no column 'query'.*fix --columns"):
        read_prompts(str(files), columns={"prompt": "query"})
    with pytest.raises(DlmaError, match="has no split 'dev'"):
        read_prompts(f"{saved}:dev", columns={"prompt": "question"})
    with pytest.raises(DlmaError, match="expected FIELD=COLUMN"):
        column_map(["question"])
