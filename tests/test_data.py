"""Prompt sources, pair files, and resumable JSONL output."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from dlma.data import JsonlWriter, ReadStats, parse_dialogue, read_pairs, read_prompts, split_hh
from dlma.errors import DataError, DlmaError


def test_parse_hh_dialogue_and_split():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How to steal?\n\nAssistant: I can't help."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How to steal?\n\nAssistant: Take it."
    assert [m["role"] for m in parse_dialogue(chosen)] == ["user", "assistant", "user", "assistant"]
    history, c, r = split_hh(chosen, rejected)
    assert history[-1] == {"role": "user", "content": "How to steal?"} and len(history) == 3
    assert (c, r) == ("I can't help.", "Take it.")


def test_read_prompts_formats(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n\n"
                                      + json.dumps({"prompt": [{"role": "user", "content": "x"}], "label": "safe"}) + "\n")
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "one"}, {"question": "two"}]))
    (tmp_path / "p.csv").write_text("prompt,label\nthree,unsafe\n")
    js = read_prompts(str(tmp_path / "p.jsonl"))
    assert [p.id for p in js] == ["a", "p-00001"] and js[1].label == "safe"
    assert [p.prompt[-1]["content"] for p in read_prompts(str(tmp_path / "p.json"))] == ["one", "two"]
    csv_p = read_prompts(str(tmp_path / "p.csv"))
    assert csv_p[0].prompt == [{"role": "user", "content": "three"}] and csv_p[0].label == "unsafe"


def test_bundled_sources_and_split():
    train, test = read_prompts("hh-harmless:train"), read_prompts("hh-harmless:test")
    assert len(train) + len(test) <= 1000 and len(test) > 150
    assert not {p.id for p in train} & {p.id for p in test}
    assert all(p.prompt[-1]["role"] == "user" for p in train[:50])
    labels = {p.label for p in read_prompts("safety-eval")}
    assert labels == {"safe", "unsafe"}


def test_hh_file_as_prompts_and_pairs(tmp_path):
    f = tmp_path / "hh.jsonl.gz"
    with gzip.open(f, "wt") as g:
        g.write(json.dumps({"chosen": "\n\nHuman: q?\n\nAssistant: good", "rejected": "\n\nHuman: q?\n\nAssistant: bad"}) + "\n")
    assert read_prompts(str(f))[0].prompt == [{"role": "user", "content": "q?"}]
    pair = read_pairs(str(f))[0]
    assert (pair["chosen"], pair["rejected"], pair["human_label"]) == ("good", "bad", True)


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_prompts(str(f))
    f.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no `prompt` field"):
        read_prompts(str(f))
    with pytest.raises(DlmaError, match="no such file"):
        read_prompts(str(tmp_path / "missing.jsonl"))


def test_empty_prompts_are_skipped_and_counted(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "   "}\n{"prompt": "b"}\n')
    stats = ReadStats()
    assert len(read_prompts(str(f), stats=stats)) == 2 and stats.empty == 1


def test_writer_resumes_and_repairs_a_cut_line(tmp_path):
    f = tmp_path / "out.jsonl"
    with JsonlWriter(f) as w:
        w.write({"id": "1"})
        w.write({"id": "2"})
    with open(f, "a") as g:
        g.write('{"id": "3", "chosen": "cut in the mi')  # a kill mid-write
    w = JsonlWriter(f)
    assert w.done == {"1", "2"}
    w.write({"id": "3"})
    w.close()
    assert [json.loads(line)["id"] for line in f.read_text().splitlines()] == ["1", "2", "3"]


def test_hh_first_turn_source_is_single_turn_and_deduplicated():
    firsts = read_prompts("hh-harmless-first:train")
    assert all(len(p.prompt) == 1 and p.prompt[0]["role"] == "user" for p in firsts)
    texts = [p.prompt[0]["content"] for p in firsts]
    assert len(texts) == len(set(texts)) and len(texts) <= 800
    full = {p.id: p for p in read_prompts("hh-harmless:train")}
    assert all(full[p.id].prompt[0] == p.prompt[0] for p in firsts[:50])


def test_duplicate_pair_ids_are_rejected_with_file_and_line(tmp_path, capsys):
    from dlma.cli import main

    f = tmp_path / "dup.jsonl"
    rec = {"prompt": "hi", "chosen": "x", "rejected": "y", "self_reward": 1.0}
    f.write_text("".join(json.dumps(dict(rec, id=i)) + "\n" for i in ("a", "b", "a")))
    with pytest.raises(DataError, match=r"dup.jsonl:3: duplicate id 'a' \(first at line 1\)"):
        read_pairs(str(f))
    for cmd in (["score"], ["train", "--loss", "sft", "--mixed-precision", "no"]):
        assert main([*cmd, "--data", str(f), "--out", str(tmp_path / f"out-{cmd[0]}"), "--no-progress"]) == 2
        assert "dup.jsonl:3: duplicate id 'a'" in capsys.readouterr().err
    f.write_text("".join(json.dumps(dict(rec, id=i)) + "\n" for i in ("a", "b", "c")))
    assert [p["id"] for p in read_pairs(str(f))] == ["a", "b", "c"]


def test_csv_with_a_byte_order_mark_and_a_150_kb_field(tmp_path):
    """Excel writes a byte-order mark first (it became part of the first column's name: "no `prompt`
    field"); a prompt of 150 KB exceeded the csv module's 128 KiB field limit (a traceback)."""
    (tmp_path / "excel.csv").write_bytes("\ufeffprompt,label\nhello,safe\n".encode("utf-8"))
    (tmp_path / "long.csv").write_text("prompt\n" + "x" * 150_000 + "\nshort\n")
    assert [(p.prompt[0]["content"], p.label) for p in read_prompts(str(tmp_path / "excel.csv"))] == [("hello", "safe")]
    assert [len(p.prompt[0]["content"]) for p in read_prompts(str(tmp_path / "long.csv"))] == [150_000, 5]


def test_prompts_must_end_with_the_users_turn_in_text(tmp_path):
    f = tmp_path / "p.jsonl"
    for prompt, says in (([{"role": "system", "content": "Be nice."}], "p.jsonl:1: `prompt`: the last message must be the user's"),
                         ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "not 'assistant'"),
                         ([{"role": "user", "content": None}], "message 1 must have a string `role` and a string `content`"),
                         ([{"role": "user"}], "message 1 must have")):
        f.write_text(json.dumps({"id": "a", "prompt": prompt}) + "\n")
        with pytest.raises(DataError, match=re.escape(says)):
            read_prompts(str(f))
        f.write_text(json.dumps({"id": "a", "prompt": prompt, "chosen": "x", "rejected": "y"}) + "\n")
        with pytest.raises(DataError, match="p.jsonl:1"):
            read_pairs(str(f))
    for name in ("hh-harmless", "hh-harmless-first", "benign-train", "harmful-train", "safety-val", "safety-test", "safety-eval"):
        assert all(p.prompt[-1]["role"] == "user" for p in read_prompts(name))  # the bundled sets all pass


def test_a_lone_surrogate_is_a_data_error(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "ok \\ud83d\\ude00"}\n{"id": "b", "prompt": "bad \\ud800"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: holds the lone surrogate '\\ud800'"):
        read_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "p.json").write_text('[{"prompt": "x", "chosen": "\\udfff", "rejected": "y"}]')
    with pytest.raises(DataError, match="p.json: holds the lone surrogate"):
        read_pairs(str(tmp_path / "p.json"))


def test_one_writer_per_output_and_no_reading_what_is_being_written(tmp_path):
    """Two writers of one file appended every record twice; a file still being written was read as a
    finished one. The lock is the run directory's (one mechanism) and goes with its holder."""
    from dlma.data import check_not_input

    out = tmp_path / "out.jsonl"
    with JsonlWriter(out) as first:
        first.write({"id": "a", "prompt": "hi", "chosen": "x", "rejected": "y"})
        with pytest.raises(DlmaError, match=rf"{out} is being written by another dlma process \(pid \d+ on .*\)"):
            JsonlWriter(out)
        with pytest.raises(DlmaError, match="out.jsonl is still being written by another dlma process"):
            read_pairs(str(out))
    assert [p["id"] for p in read_pairs(str(out))] == ["a"]  # closed: readable, and writable again
    JsonlWriter(out).close()
    with pytest.raises(DlmaError, match="is the input file"):
        check_not_input(tmp_path / "." / "out.jsonl", [out])
    check_not_input(tmp_path / "other.jsonl", [out])
