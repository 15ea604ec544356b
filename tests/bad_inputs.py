"""The bad-input catalogue: every malformed input dlma handles, the command that meets it and
what its one-line error must say. tests/test_bad_input.py runs each case; scripts/bad_input_table.py
writes docs/bad-input.md from the errors the commands actually print."""

from __future__ import annotations

import contextlib
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

PAIR = {"id": "a", "prompt": "Hello there", "chosen": "Hi", "rejected": "Go away"}
SCORED = dict(PAIR, self_reward=3.0, ref_lp_chosen=-4.0, ref_lp_rejected=-6.0)


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _lines(*recs) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs)


@dataclass
class Case:
    kind: str                       # files, fields, types, encodings, options, configs, models
    what: str                       # the bad input, in words
    files: dict[str, Callable[[], bytes | str]]  # name -> content, written into a fresh directory
    argv: Callable[[Path], list[str]]  # the command, given that directory
    says: str                       # a part of the one-line error
    busy: str = ""                  # a file of the directory that another writer holds while the command runs


def _train(d: Path, data: str, *extra: str) -> list[str]:
    return ["train", "--data", str(d / data), "--out", str(d / "model"), "--no-progress", "--mixed-precision", "no", *extra]


def _gen(d: Path, prompts: str, *extra: str) -> list[str]:
    return ["generate", "--prompts", str(d / prompts) if prompts else "", "--out", str(d / "pairs.jsonl"), "--no-progress", *extra]


def _score(d: Path, data: str, *extra: str) -> list[str]:
    return ["score", "--data", str(d / data), "--out", str(d / "scored.jsonl"), "--no-progress", *extra]


def _run(d: Path, *extra: str) -> list[str]:
    return ["run", "--run-dir", str(d / "r"), "--no-progress", *extra]


def _preset(text: str) -> dict[str, Callable[[], str]]:
    """A prompt file and the preset file mine.yaml."""
    return {"p.jsonl": lambda: _lines({"id": "a", "prompt": "x"}), "mine.yaml": lambda: text}


DEMO = "demonstrations:\n  - - user: hi\n      positive: Hello!\n      negative: What.\n"


CASES = [
    Case("files", "prompt file that does not exist", {}, lambda d: _gen(d, "missing.jsonl"), "missing.jsonl"),
    Case("files", "a line that is not JSON", {"p.jsonl": lambda: _lines({"id": "a", "prompt": "x"}, '{"id": "b", "prompt": ')},
         lambda d: _gen(d, "p.jsonl"), "p.jsonl:2"),
    Case("files", "a .gz file cut short", {"p.jsonl.gz": lambda: _cut(gzip.compress(_lines(*[dict(PAIR, id=str(i)) for i in range(400)]).encode()))},
         lambda d: _score(d, "p.jsonl.gz"), "cut short or corrupt"),
    Case("files", "a pair file with no pairs", {"empty.jsonl": lambda: ""}, lambda d: _score(d, "empty.jsonl"), "no pairs"),
    Case("encodings", "a line that is not UTF-8", {"p.jsonl": lambda: _lines(PAIR).encode() + b'{"id": "b", "prompt": "caf\xe9"}\n'},
         lambda d: _score(d, "p.jsonl"), "p.jsonl:2: not UTF-8"),
    Case("fields", "a prompt record without a prompt", {"p.jsonl": lambda: _lines({"id": "a", "text": "x"})},
         lambda d: _gen(d, "p.jsonl"), "p.jsonl:1"),
    Case("fields", "a pair without `rejected`", {"p.jsonl": lambda: _lines({k: v for k, v in PAIR.items() if k != "rejected"})},
         lambda d: _score(d, "p.jsonl"), "rejected"),
    Case("fields", "two pairs with the same id", {"p.jsonl": lambda: _lines(PAIR, PAIR)},
         lambda d: _score(d, "p.jsonl"), "duplicate"),
    Case("fields", "two prompts with the same id", {"p.jsonl": lambda: _lines({"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"})},
         lambda d: _gen(d, "p.jsonl"), "duplicate"),
    Case("fields", "DLMA training on pairs that were never scored", {"p.jsonl": lambda: _lines(PAIR)},
         lambda d: _train(d, "p.jsonl"), "self_reward"),
    Case("types", "a prompt that is a number", {"p.jsonl": lambda: _lines({"id": "a", "prompt": 42})},
         lambda d: _gen(d, "p.jsonl"), "p.jsonl:1"),
    Case("types", "a self_reward of NaN", {"p.jsonl": lambda: _lines(dict(SCORED, self_reward=float("nan")))},
         lambda d: _train(d, "p.jsonl"), "p.jsonl:1"),
    Case("types", "a reference log-prob of Infinity", {"p.jsonl": lambda: _lines(dict(SCORED, ref_lp_chosen=float("inf")))},
         lambda d: _train(d, "p.jsonl"), "p.jsonl:1"),
    Case("types", "a reference log-prob of 1e308 (finite, beyond float32)", {"p.jsonl": lambda: _lines(dict(SCORED, ref_lp_chosen=-1e308))},
         lambda d: _train(d, "p.jsonl"), "p.jsonl:1: `ref_lp_chosen` is -1e+308; a summed log-probability lies in"),
    Case("types", "a positive reference log-prob", {"p.jsonl": lambda: _lines(dict(SCORED, ref_lp_rejected=5.0))},
         lambda d: _train(d, "p.jsonl"), "p.jsonl:1: `ref_lp_rejected` is 5.0"),
    Case("fields", "pairs whose chosen answer equals the rejected one, or is empty",
         {"p.jsonl": lambda: _lines(dict(SCORED, rejected="Hi"), dict(SCORED, id="b", chosen=" "))},
         lambda d: _train(d, "p.jsonl"), "no pairs left to train on"),
    Case("options", "--top-p outside (0, 1]", {}, lambda d: _gen(d, "", "--top-p", "5"), "top_p (--top-p) must be in (0, 1]"),
    Case("options", "--max-new-tokens 0", {}, lambda d: _gen(d, "", "--max-new-tokens", "0"), "max_new_tokens (--max-new-tokens) must be"),
    Case("options", "a negative learning rate", {}, lambda d: _train(d, "x.jsonl", "--lr=-1e-5"), "lr (--lr) must be at least 0"),
    Case("options", "an unknown dtype", {}, lambda d: _gen(d, "", "--dtype", "float8"), "dtype (--dtype) must be"),
    Case("options", "an unknown preset", {"p.jsonl": lambda: _lines({"id": "a", "prompt": "x"})},
         lambda d: _gen(d, "p.jsonl", "--preset", "no-such-preset"), "no-such-preset"),
    Case("configs", "a YAML config that does not parse", {"c.yaml": lambda: "generate: [top_p: 1\n"},
         lambda d: ["run", "--config", str(d / "c.yaml"), "--run-dir", str(d / "r")], "invalid YAML: expected ',' or ']'"),
    Case("configs", "a preset file that is not valid YAML", {"p.jsonl": lambda: _lines({"id": "a", "prompt": "x"}), "mine.yaml": lambda: "name: [x\n"},
         lambda d: _gen(d, "p.jsonl", "--preset", str(d / "mine.yaml")), "invalid YAML"),
    Case("configs", "a config key that does not exist", {"c.yaml": lambda: "generate:\n  top_k: 5\n"},
         lambda d: ["run", "--config", str(d / "c.yaml"), "--run-dir", str(d / "r")], "top_k"),
    Case("configs", "a config value out of range", {"c.yaml": lambda: "sampling:\n  top_p: 5\n"},
         lambda d: ["run", "--config", str(d / "c.yaml"), "--run-dir", str(d / "r")], "c.yaml.sampling: top_p (--top-p) must be in (0, 1], got 5"),
    Case("configs", "--set without `=`", {}, lambda d: ["run", "--set", "train.lr", "--run-dir", str(d / "r")], "train.lr"),
    # misuse: numbers that would reach the weights, coercions, run directories
    Case("options", "an infinite learning rate", {}, lambda d: _train(d, "x.jsonl", "--lr", "inf"), "lr (--lr) must be a finite number, got inf"),
    Case("options", "an infinite --interpolate", {}, lambda d: _train(d, "x.jsonl", "--interpolate", "inf"),
         "interpolate (--interpolate) must be a finite number"),
    Case("options", "a NaN --margin-weight", {}, lambda d: _train(d, "x.jsonl", "--margin-weight", "nan"),
         "margin_weight (--margin-weight) must be a finite number, got nan"),
    Case("configs", "--set train.lr=.inf", {}, lambda d: _run(d, "--set", "train.lr=.inf"), "lr (--lr) must be a finite number, got inf"),
    Case("configs", "--set generate.limit=2.9 (not a whole number)", {}, lambda d: _run(d, "--set", "generate.limit=2.9"),
         "limit=2.9 is not a valid int (not a whole number)"),
    Case("configs", "--set generate.prompts=[a,b] (a list for a comma-separated setting)", {},
         lambda d: _run(d, "--set", "generate.prompts=[a,b]"), "several sources or presets are one string, comma-separated"),
    Case("configs", "--set run_dir= (the working directory)", {}, lambda d: ["run", "--set", "run_dir=", "--no-progress"],
         "run_dir (--run-dir) must be a directory"),
    Case("options", "--compare with no method", {}, lambda d: _run(d, "--compare", ","), "--compare needs one or more methods"),
    # misuse: files written twice at once, read while written, edited since, or both input and output
    Case("files", "--out is the --data file", {"p.jsonl": lambda: _lines(PAIR)},
         lambda d: ["score", "--data", str(d / "p.jsonl"), "--out", str(d / "p.jsonl"), "--no-progress"], "is the input file"),
    Case("files", "--out is the --prompts file", {"p.jsonl": lambda: _lines({"id": "a", "prompt": "x"})},
         lambda d: ["generate", "--prompts", str(d / "p.jsonl"), "--out", str(d / "p.jsonl"), "--no-progress"], "is the input file"),
    Case("files", "an output another dlma process is writing", {"p.jsonl": lambda: _lines(PAIR)},
         lambda d: _score(d, "p.jsonl"), "is being written by another dlma process", busy="scored.jsonl"),
    Case("files", "a pair file another dlma process is still writing", {"p.jsonl": lambda: _lines(PAIR)},
         lambda d: _score(d, "p.jsonl"), "p.jsonl is still being written by another dlma process", busy="p.jsonl"),
    Case("files", "pairs edited since part of them was scored into --out",
         {"p.jsonl": lambda: _lines(PAIR), "scored.jsonl": lambda: _lines(dict(SCORED, chosen="Hello"))},
         lambda d: _score(d, "p.jsonl"), "scored.jsonl:1: record 'a' was made from 'a' as it was before"),
    Case("files", "prompts edited since part of them was generated into --out",
         {"p.jsonl": lambda: _lines({"id": "a", "prompt": "Hello there, friend"}),
          "pairs.jsonl": lambda: _lines(dict(PAIR, prompt_id="a", prompt=[{"role": "user", "content": "Hello there"}],
                                             preset="harmless"))},
         lambda d: _gen(d, "p.jsonl"), "pairs.jsonl:1: record 'a' was made from 'a' as it was before"),
    # misuse: prompts that are no question to answer
    Case("fields", "a prompt that is only a system message", {"p.jsonl": lambda: _lines({"id": "a", "prompt": [{"role": "system", "content": "Be nice."}]})},
         lambda d: _gen(d, "p.jsonl"), "p.jsonl:1: `prompt`: the last message must be the user's (role user), not 'system'"),
    Case("fields", "a prompt whose last turn is the assistant's",
         {"p.jsonl": lambda: _lines({"id": "a", "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})},
         lambda d: _gen(d, "p.jsonl"), "the last message must be the user's (role user), not 'assistant'"),
    Case("types", "a message whose content is null", {"p.jsonl": lambda: _lines({"id": "a", "prompt": [{"role": "user", "content": None}]})},
         lambda d: _gen(d, "p.jsonl"), "p.jsonl:1: `prompt`: message 1 must have a string `role` and a string `content`"),
    Case("encodings", "a JSON string holding a lone surrogate (\\ud800)", {"p.jsonl": lambda: '{"id": "a", "prompt": "bad \\ud800 text"}\n'},
         lambda d: _gen(d, "p.jsonl"), "p.jsonl:1: holds the lone surrogate '\\ud800'"),
    # misuse: presets that contrast nothing or say something else than meant
    Case("configs", "a preset whose p+ and p- are the same text (demos_per_prompt: 0)",
         _preset("name: same\n" + DEMO + "demos_per_prompt: 0\n"), lambda d: _gen(d, "p.jsonl", "--preset", str(d / "mine.yaml")),
         "p+ and p- are the same text"),
    Case("configs", "a preset whose only demonstration set is empty", _preset("name: same\ndemonstrations: [[]]\n"),
         lambda d: _gen(d, "p.jsonl", "--preset", str(d / "mine.yaml")), "p+ and p- are the same text"),
    Case("configs", "a preset with a misspelt demonstration key (positve:)",
         _preset("name: typo\ndemonstrations:\n  - - user: hi\n      positve: Hello!\n      negative: What.\n"),
         lambda d: _gen(d, "p.jsonl", "--preset", str(d / "mine.yaml")), "unknown key(s) positve in a demonstration"),
    Case("configs", "a preset with an unknown key", _preset("name: typo\n" + DEMO + "demos_per_promt: 1\n"),
         lambda d: _gen(d, "p.jsonl", "--preset", str(d / "mine.yaml")), "unknown key(s) demos_per_promt at the top level"),
    Case("configs", "a preset with demos_per_prompt: two", _preset("name: words\n" + DEMO + "demos_per_prompt: two\n"),
         lambda d: _gen(d, "p.jsonl", "--preset", str(d / "mine.yaml")), "demos_per_prompt must be a whole number >= 0, got 'two'"),
    Case("models", "--model naming a directory that does not exist", {"p.jsonl": lambda: _lines(PAIR)},
         lambda d: _score(d, "p.jsonl", "--model", "/nonexistent/path"), "cannot load model '/nonexistent/path' (directory): no such directory"),
    Case("models", "a model directory without a tokenizer", {"p.jsonl": lambda: _lines(PAIR), "m/config.json": lambda: "{}"},
         lambda d: _score(d, "p.jsonl", "--model", str(d / "m")), "the directory holds no tokenizer files"),
    Case("models", "a model id that is neither local nor cached", {"p.jsonl": lambda: _lines(PAIR)},
         lambda d: _score(d, "p.jsonl", "--model", "no-such-org/no-such-model"), "cannot load model 'no-such-org/no-such-model'"),
    Case("models", "--device cuda on a machine without CUDA", {"p.jsonl": lambda: _lines(PAIR)},
         lambda d: _score(d, "p.jsonl", "--device", "cuda"), "cuda"),
]


@dataclass
class Handled:
    """A misuse that gets correct output rather than an error, and the test that shows it."""

    kind: str
    what: str
    does: str
    test: str                       # tests/FILE.py::NAME


HANDLED = [
    Handled("encodings", "an Excel CSV with a byte-order mark", "read as any CSV (the mark is not part of the first column's name)",
            "tests/test_data.py::test_csv_with_a_byte_order_mark_and_a_150_kb_field"),
    Handled("files", "a CSV field of 150 KB", "read as a prompt (the csv module's 128 KiB limit is lifted)",
            "tests/test_data.py::test_csv_with_a_byte_order_mark_and_a_150_kb_field"),
    Handled("options", "--num-pairs in the millions", "pairs are written as they are sampled, a batch at a time (not all of a prompt's first)",
            "tests/test_generate.py::test_a_huge_num_pairs_writes_pairs_as_they_come"),
    Handled("files", "pairs edited after generation recorded their log-probs", "scoring recomputes the edited pairs' log-probs",
            "tests/test_reward.py::test_edited_pairs_and_relative_preset_files"),
    Handled("files", "a pair file naming its preset by a path relative to where it was generated",
            "scored from any directory (generate records the preset file's absolute path too)",
            "tests/test_reward.py::test_edited_pairs_and_relative_preset_files"),
    Handled("files", "prompts edited since `dlma evaluate` answered them into --out", "the edited prompts are answered again",
            "tests/test_evaluate.py::test_edited_prompts_are_answered_again"),
    Handled("files", "rerunning a finished run with settings that fail late (train.min_reward=1e9)",
            "the new stage runs beside the old one, which stays (final-model, report) until the new one is done",
            "tests/test_pipeline.py::test_a_rerun_whose_settings_fail_keeps_the_old_result"),
    Handled("files", "a corrupt done.json or manifest.json in a run directory", "counts as absent: the stage resumes",
            "tests/test_pipeline.py::test_corrupt_markers_count_as_absent"),
]


@dataclass
class Request:
    """A malformed request to the chat server (`python -m dlma.serve`) and its answer: a status and a
    JSON error, after which the server keeps serving."""

    what: str
    body: bytes
    status: int
    says: str
    length: int | None = None       # the Content-Length sent (default: the body's)


def _chat(**kw) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **kw}).encode()


REQUESTS = [
    Request("a body that is a JSON list", b"[]", 400, "the body must be a JSON object, got list"),
    Request("a body that is JSON null", b"null", 400, "the body must be a JSON object, got NoneType"),
    Request("a body that is a JSON string", b'"x"', 400, "the body must be a JSON object, got str"),
    Request("a body that is not JSON", b"{oops", 400, "body is not JSON"),
    Request("messages that are not objects", json.dumps({"messages": [1, 2]}).encode(), 400, "message 1 must have a string `role`"),
    Request("no messages", json.dumps({"messages": []}).encode(), 400, "`messages` must be a non-empty list"),
    Request("a conversation ending with the assistant's turn",
            json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}).encode(),
            400, "the last message must be the user's"),
    Request("a lone surrogate in a message", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "lone surrogate"),
    Request("max_tokens \"abc\"", _chat(max_tokens="abc"), 400, "`max_tokens` must be a whole number of at least 1, got 'abc'"),
    Request("max_tokens -5", _chat(max_tokens=-5), 400, "`max_tokens` must be a whole number of at least 1, got -5"),
    Request("a negative Content-Length", _chat(), 400, "Content-Length must be between 0 and", length=-5),
    Request("a Content-Length of 1 GB", _chat(), 413, "Content-Length must be between 0 and", length=1 << 30),
    Request("a Content-Length longer than the body sent", _chat(), 408, "the body did not arrive", length=len(_chat()) + 100),
]


def send(url: str, req: Request, timeout: float = 30) -> tuple[int, dict]:
    """POST req to url's /chat/completions with its Content-Length as given; (status, JSON answer)."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.putrequest("POST", u.path + "/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(req.body) if req.length is None else req.length))
        conn.endheaders()
        if req.length is None or req.length >= 0:
            conn.send(req.body)
        res = conn.getresponse()
        return res.status, json.loads(res.read())
    finally:
        conn.close()


@contextlib.contextmanager
def running(case: Case, d: Path) -> Iterator[list[str]]:
    """The case's files written into d, the file it names as busy held by another writer; its command."""
    from dlma.data import release_lock, take_lock, writer_lock

    d.mkdir(parents=True, exist_ok=True)
    for name, make in case.files.items():
        content = make()
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    lock = take_lock(writer_lock(d / case.busy), str) if case.busy else None
    try:
        yield case.argv(d)
    finally:
        if lock is not None:
            release_lock(lock)
