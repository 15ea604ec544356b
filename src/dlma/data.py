"""Read prompt sources and pair files, validate records, write JSONL that resumes.

Every stage writes JSONL one record a line, flushed as it goes. A rerun reads the ids
already written and skips them; a line cut short by a kill is dropped before appending,
so a killed run loses at most the records in flight and never duplicates one.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import platform
import re
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence, TypeVar

from . import pairfile
from .errors import DataError, DlmaError
from .prompts import Messages, as_messages

T = TypeVar("T")

BUNDLED_HH = "hh-harmless"
BUNDLED_SAFETY = "safety-eval"
# name -> file in dlma/resources
BUNDLED = {BUNDLED_HH: "hh-rlhf-harmless-dev.jsonl.gz", BUNDLED_SAFETY: "safety-eval.jsonl",
           "benign-train": "benign-train.jsonl", "hh-harmless-first": "hh-rlhf-harmless-dev.jsonl.gz",
           "harmful-train": "harmful-train.jsonl", "safety-val": "safety-val.jsonl", "safety-test": "safety-test.jsonl"}
# The bundled HH file holds 1,000 records; the last 200 are held out for evaluation.
HH_TEST_START = 800
# The ways one request is asked (data/phrasings/SPEC.md). A prompt set whose records carry
# `request` and `phrasing` fields can be read whole, or through a selector after a colon:
# `:original` (each request's original wording), `:rotate` (one phrasing per request, dealt in
# turn within each label and category, so the set carries no phrasing cue), or one phrasing.
PHRASINGS = ("question", "imperative", "polite", "story", "casual")
PHRASING_SELECTORS = ("original", "rotate") + PHRASINGS


@dataclass
class PromptRecord:
    """A query to generate answers for: `prompt` as chat messages, optional `label`."""

    id: str
    prompt: Messages
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadStats:
    """What reading a source skipped, so summaries can say it."""

    read: int = 0
    empty: int = 0


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("dlma.resources").joinpath(name)))


def _open_text(path: Path):
    """Text of a (gzipped) file; utf-8-sig drops the byte-order mark Excel writes first, which
    otherwise became part of the first column's name."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(obj: Any) -> str | None:
    """The first lone UTF-16 surrogate in a JSON value's strings, else None. JSON reads "\\ud800"
    without complaint, but it is no character: writing or tokenizing it failed with a traceback."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return ascii(exc.object[exc.start:exc.end])
    return None


def _text_only(path: Path, lineno: int | None, obj: Any) -> None:
    bad = lone_surrogate(obj)
    if bad is not None:
        raise DataError(path, lineno, f"holds the lone surrogate {bad}, which is no character (half of a pair?); "
                        "fix the text")


def _readable(path: Path, lines: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    """Pass records through; undecodable text or a cut or corrupt .gz becomes a DataError."""
    last = 0
    try:
        for lineno, obj in lines:
            last = lineno
            yield lineno, obj
    except UnicodeDecodeError as exc:
        raise DataError(path, None, f"not UTF-8 text ({exc.reason}, after line {last}); save the file as UTF-8") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(path, None, f"compressed file is cut short or corrupt, after line {last} ({exc})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DlmaError(f"{path}: no such file")
    return _readable(path, _jsonl_lines(path))


def _jsonl_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, lineno, f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            if _SURROGATE_ESCAPE.search(raw):  # only then can a string hold one
                _text_only(path, lineno, obj)
            yield lineno, obj


def _iter_records(path: Path) -> Iterator[tuple[int, dict]]:
    check_not_being_written(path)
    return _readable(path, _iter_any(path))


def _iter_any(path: Path) -> Iterator[tuple[int, dict]]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from iter_jsonl(path)
    elif name.endswith((".json", ".json.gz")):
        try:
            with _open_text(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
        if isinstance(data, dict):
            data = data.get("data") or data.get("records") or [data]
        if not isinstance(data, list):
            raise DataError(path, None, "expected a list of objects")
        for i, obj in enumerate(data, 1):
            if not isinstance(obj, dict):
                raise DataError(path, None, f"item {i}: expected an object")
            _text_only(path, None, obj)
            yield i, obj
    elif name.endswith((".csv", ".csv.gz", ".tsv")):
        yield from _csv_rows(path, "\t" if name.endswith(".tsv") else ",")
    else:
        raise DlmaError(f"{path}: unknown file type; use .jsonl, .json or .csv (optionally .gz)")


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    """(line, row) of a CSV file; a field may be as long as a prompt gets (the csv module's
    default limit of 128 KiB was a traceback), and a malformed row is a DataError."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for row in reader:
                yield reader.line_num, dict(row)
        except csv.Error as exc:
            raise DataError(path, reader.line_num, f"not valid CSV ({exc})") from None


# -- HH-RLHF dialogues -------------------------------------------------------
def parse_dialogue(text: str) -> Messages:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> chat messages."""
    msgs: Messages = []
    for chunk in ("\n\n" + text.lstrip("\n")).split("\n\nHuman: ")[1:]:
        human, *assistant = chunk.split("\n\nAssistant:")
        turns = [("user", human)] + [("assistant", a) for a in assistant]
        for role, content in turns:
            # HH-RLHF has a few dialogues with two Assistant turns in a row: merge them,
            # so roles alternate as chat templates expect.
            if msgs and msgs[-1]["role"] == role:
                msgs[-1]["content"] += "\n\n" + content.strip()
            else:
                msgs.append({"role": role, "content": content.strip()})
    return msgs


def split_hh(chosen: str, rejected: str) -> tuple[Messages, str, str]:
    """Shared history (ending with a user turn) and the two final assistant answers."""
    c, r = parse_dialogue(chosen), parse_dialogue(rejected)
    if not c or c[-1]["role"] != "assistant" or not r or r[-1]["role"] != "assistant":
        raise ValueError("each dialogue must end with an Assistant turn")
    history = c[:-1]
    if not history or history[-1]["role"] != "user":
        raise ValueError("the history must end with a Human turn")
    return history, c[-1]["content"], r[-1]["content"]


def _is_hh(obj: dict) -> bool:
    return isinstance(obj.get("chosen"), str) and "Human:" in obj["chosen"] and "prompt" not in obj


def _prompt_of(obj: dict, path: Path, lineno: int) -> Messages:
    if _is_hh(obj):
        try:
            history, _, _ = split_hh(obj["chosen"], obj.get("rejected") or obj["chosen"])
        except ValueError as exc:
            raise DataError(path, lineno, f"HH-RLHF dialogue: {exc}") from None
        return history
    for key in ("prompt", "messages", "query", "question", "instruction"):
        if key in obj:
            p = obj[key]
            if not isinstance(p, (str, list)):
                raise DataError(path, lineno, f"`{key}` must be a string or a list of {{role, content}} messages")
            try:
                return as_messages(p)
            except DlmaError as exc:
                raise DataError(path, lineno, f"`{key}`: {exc}") from None
    raise DataError(path, lineno, "no `prompt` field (or HH-RLHF `chosen`/`rejected` dialogues)")


def _resolve_source(source: str) -> tuple[Path | None, str | None]:
    """(path, split or phrasing selector) for files and bundled names; (None, None) for a HF dataset name."""
    base, _, split = source.partition(":")
    if base in BUNDLED:
        return bundled_path(BUNDLED[base]), split or None
    head, _, tail = source.rpartition(":")
    if head and tail in PHRASING_SELECTORS and Path(head).is_file():
        return Path(head), tail
    p = Path(source)
    if p.is_dir() or (head and Path(head).is_dir()):  # a `datasets` dataset saved or laid out in a directory
        return None, None
    if p.exists():
        return p, None
    if os.sep in source or p.suffix in (".jsonl", ".json", ".csv", ".gz"):
        raise DlmaError(f"{source}: no such file")
    return None, None


def _from_hf_dataset(name: str) -> Iterator[tuple[int, dict]]:
    """Rows of a `datasets` dataset: NAME[:SPLIT], NAME a cached Hub id, a directory written by
    `save_to_disk`, or a directory of data files (split default: train)."""
    try:
        import datasets
    except ImportError:
        raise DlmaError(f"{name!r} is neither a file nor a bundled set ({', '.join(BUNDLED)}); "
                        "to read a Hugging Face dataset, pip install 'dlma[datasets]'") from None
    base, _, split = name.rpartition(":") if ":" in name and not Path(name).is_dir() else (name, "", "")
    split = split or "train"
    try:
        if any((Path(base) / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(base)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(base, split=split)
    except KeyError:
        raise DlmaError(f"dataset {base!r} has no split {split!r}; name one after a colon, e.g. {base}:test") from None
    except Exception as exc:  # datasets raises many types for "not cached/offline"
        raise DlmaError(f"cannot load dataset {base!r} (only locally cached datasets work offline): {exc}") from None
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


PROMPT_FIELDS = ("prompt", "id", "label")


def column_map(items: Sequence[str]) -> dict[str, str]:
    """FIELD=COLUMN items (`--columns prompt=question id=qid`) -> {field: column}."""
    out = {}
    for item in items:
        field_name, sep, column = item.partition("=")
        if not sep or field_name.strip() not in PROMPT_FIELDS or not column.strip():
            raise DlmaError(f"--columns {item!r}: expected FIELD=COLUMN with FIELD one of {', '.join(PROMPT_FIELDS)}, "
                            "e.g. prompt=question")
        out[field_name.strip()] = column.strip()
    return out


def _mapped(obj: dict, columns: dict[str, str], where: Path, lineno: int) -> dict:
    """A source row with its columns renamed to dlma's prompt fields."""
    missing = [c for c in columns.values() if c not in obj]
    if missing:
        raise DataError(where, lineno, f"no column {missing[0]!r} (it has: {', '.join(map(str, obj))}); fix --columns")
    return {**{k: v for k, v in obj.items() if k not in columns.values()}, **{f: obj[c] for f, c in columns.items()}}


def read_prompts(source: str, limit: int | None = None, stats: ReadStats | None = None,
                 columns: dict[str, str] | None = None) -> list[PromptRecord]:
    """Prompts from a file (JSONL/JSON/CSV, plain or HH-RLHF), a bundled set, or a `datasets`
    dataset (a cached Hub id or a local directory, NAME[:SPLIT]); `columns` ({field: column},
    `column_map`) names the columns that hold the prompt, id and label.

    Bundled sets: `hh-harmless` (1,000 HH-RLHF harmless queries; `hh-harmless:train` is
    the first 800, `hh-harmless:test` the last 200; `hh-harmless-first[:train|:test]` keeps
    only each dialogue's opening request, without repeats); for training, `harmful-train`
    (written harmful requests) and `benign-train` (written harmless questions that sound
    dangerous); held out, labelled unsafe/safe for refusal rates, `safety-val` (for tuning;
    it holds the older 80-prompt `safety-eval`) and `safety-test` (for reporting). No held-out
    prompt nearly duplicates a training prompt or a preset demonstration
    (scripts/build_safety_sets.py, tests/test_safety_sets.py). Empty prompts are skipped and counted.
    """
    stats = stats if stats is not None else ReadStats()
    path, split = _resolve_source(source)
    if split in PHRASING_SELECTORS:
        return select_phrasings(read_prompts(source.rpartition(":")[0], None, stats, columns), split, source)[:limit]
    rows = _iter_records(path) if path is not None else _from_hf_dataset(source)
    where = path if path is not None else Path(source)
    out: list[PromptRecord] = []
    seen: set[str] = set()
    seen_first: set[str] = set()
    for index, (lineno, obj) in enumerate(rows):
        if split and path is not None and path.name.startswith("hh-rlhf"):
            in_test = index >= HH_TEST_START
            if (split == "test") != in_test:
                continue
        if columns:
            obj = _mapped(obj, columns, where, lineno)
        msgs = _prompt_of(obj, where, lineno)
        if source.partition(":")[0] == "hh-harmless-first":
            # the opening request alone: single-turn queries, like most users' first message
            msgs = msgs[:1]
            if msgs and msgs[0]["content"] in seen_first:
                continue
            seen_first.add(msgs[0]["content"] if msgs else "")
        stats.read += 1
        if not msgs or not msgs[-1]["content"].strip():
            stats.empty += 1
            continue
        pid = str(obj.get("id", f"{where.name.split('.')[0]}-{index:05d}"))
        if pid in seen:
            raise DataError(where, lineno, f"duplicate id {pid!r}")
        seen.add(pid)
        label = obj.get("label")
        extra = {k: v for k, v in obj.items() if k not in ("id", "prompt", "label", "chosen", "rejected", "messages")}
        out.append(PromptRecord(pid, msgs, str(label) if label is not None else None, extra))
        if limit is not None and len(out) >= limit:
            break
    return out


def select_phrasings(prompts: list[PromptRecord], selector: str, source: str = "") -> list[PromptRecord]:
    """The prompts `selector` keeps (PHRASING_SELECTORS) of a set whose records name their `request` and `phrasing`."""
    if any("request" not in p.extra or p.extra.get("phrasing") not in PHRASINGS for p in prompts):
        raise DlmaError(f"{source}: `:{selector}` needs every record to carry `request` and `phrasing` "
                        f"(one of {', '.join(PHRASINGS)}); this set does not")
    if selector == "original":
        return [p for p in prompts if p.extra.get("original")]
    if selector in PHRASINGS:
        return [p for p in prompts if p.extra["phrasing"] == selector]
    dealt: dict[tuple, int] = {}
    order: dict[str, int] = {}
    for p in prompts:
        order.setdefault(p.extra["request"], len(order))
    pick: dict[str, str] = {}
    for request in order:
        first = next(p for p in prompts if p.extra["request"] == request)
        group = (first.label, first.extra.get("category"))
        k = dealt.get(group, zlib.crc32(repr(group).encode()) % len(PHRASINGS))
        pick[request], dealt[group] = PHRASINGS[k % len(PHRASINGS)], k + 1
    return [p for p in prompts if p.extra["phrasing"] == pick[p.extra["request"]]]


def load_eval_prompts(sources: str, limit: int | None = None) -> list[PromptRecord]:
    """Prompts from comma-separated sources, `limit` per source; `extra["source"]` says which.

    A labelled source is cut to `limit` round-robin over its labels (safety-eval lists its
    unsafe prompts first; its first 12 would hold no safe prompt to measure over-refusal on).
    """
    out: list[PromptRecord] = []
    seen: set[str] = set()
    for src in [s.strip() for s in sources.split(",") if s.strip()]:
        for p in _balanced(read_prompts(src), limit):
            if p.id in seen:
                p.id = f"{src}/{p.id}"
            if p.id in seen:
                raise DlmaError(f"{src}: prompt id {p.id!r} appears twice")
            seen.add(p.id)
            p.extra = {**p.extra, "source": src}
            out.append(p)
    if not out:
        raise DlmaError(f"{sources}: no usable prompts")
    return out


def _balanced(prompts: list[PromptRecord], limit: int | None) -> list[PromptRecord]:
    """The first `limit` prompts, dealt round-robin over the labels; a request's phrasings
    (records sharing `request`) are taken together, so every phrasing is measured on the same requests."""
    if limit is None or len(prompts) <= limit:
        return prompts
    units: dict[Any, list[PromptRecord]] = {}
    for p in prompts:
        units.setdefault(p.extra.get("request", p.id), []).append(p)
    by_label: dict[str | None, list[list[PromptRecord]]] = {}
    for unit in units.values():
        by_label.setdefault(unit[0].label, []).append(unit)
    picked: list[PromptRecord] = []
    queues = list(by_label.values())
    while len(picked) < limit and any(queues):
        for q in queues:
            if q and len(picked) < limit:
                picked += q.pop(0)
    return picked


def swap_sides(rec: dict) -> dict:
    """A pair record with `chosen` and `rejected` exchanged: every per-side field moves with its response
    (texts, cut flags, token counts, references of whole responses and of openings, log-probs under p+
    and p-), and the self-reward R, antisymmetric in the two responses, changes sign."""
    out = {k.replace("chosen", "\0").replace("rejected", "chosen").replace("\0", "rejected"): v for k, v in rec.items()}
    if isinstance(out.get("self_reward"), (int, float)):
        out["self_reward"] = -out["self_reward"]
    return out


def read_pairs(source: str, limit: int | None = None) -> list[dict]:
    """Pair records with `id`, `prompt` (messages), `chosen`, `rejected` (texts) and all other fields kept.

    Accepts dlma pair files (TRL's conversational format, or dlma's older one with a notice), any
    JSONL with prompt/chosen/rejected as strings or chat messages (TRL's explicit or implicit
    prompt), and HH-RLHF dialogues (then `human_label` is set: `chosen` is the human-preferred side).
    """
    path, split = _resolve_source(source)
    if path is None:
        raise DlmaError(f"{source}: no such file")
    out: list[dict] = []
    first_line: dict[str, int] = {}  # id -> line: resume skips ids already written, so ids must be unique
    for index, (lineno, obj) in enumerate(_iter_records(path)):
        if split and path.name.startswith("hh-rlhf") and (split == "test") != (index >= HH_TEST_START):
            continue
        rec = dict(obj)
        if _is_hh(obj):
            if not isinstance(obj.get("rejected"), str):
                raise DataError(path, lineno, "HH-RLHF record needs `rejected`")
            try:
                history, chosen, rejected = split_hh(obj["chosen"], obj["rejected"])
            except ValueError as exc:
                raise DataError(path, lineno, f"HH-RLHF dialogue: {exc}") from None
            rec.update(prompt=history, chosen=chosen, rejected=rejected, human_label=True)
        else:
            if pairfile.is_legacy(obj):
                pairfile.notice_legacy(path)
            shared = pairfile.implicit_prompt(obj)  # TRL's implicit-prompt form: the turns both answers share
            rec["prompt"] = (_prompt_of(obj, path, lineno) if "prompt" in obj or not shared else []) + as_messages(shared)
            for key in ("chosen", "rejected"):
                text = pairfile.answer_text(obj.get(key))
                if text is None:
                    raise DataError(path, lineno, f"`{key}` must be a string or chat messages ending with an assistant turn")
                rec[key] = text
        for key, value in obj.items():
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
                raise DataError(path, lineno, f"`{key}` is {value}; numbers must be finite (no NaN or Infinity)")
        rec.setdefault("id", f"{path.name.split('.')[0]}-{index:05d}")
        rec["id"] = str(rec["id"])
        if rec["id"] in first_line:
            raise DataError(path, lineno, f"duplicate id {rec['id']!r} (first at line {first_line[rec['id']]}); "
                            "pair ids must be unique")
        first_line[rec["id"]] = lineno
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


def pair_digest(rec: dict) -> str:
    """A short hash of what a pair's generation log-probs were computed on (its prompt, both
    responses and whether each was cut): scoring reuses them only for the pair as it was made."""
    what = [rec.get("prompt"), rec.get("chosen"), rec.get("rejected"),
            bool(rec.get("chosen_truncated")), bool(rec.get("rejected_truncated"))]
    return f"{zlib.crc32(json.dumps(what, ensure_ascii=False).encode()):08x}"


def check_finite(record: dict, keys: list[str], where: str) -> None:
    """A NaN or inf is an error naming the record, never a silent number in the output."""
    for k in keys:
        v = record.get(k)
        if isinstance(v, float) and not math.isfinite(v):
            raise DlmaError(f"{where}: record {record.get('id')!r} has {k}={v}; refusing to write a non-finite value")


# -- one writer at a time ----------------------------------------------------------------
def take_lock(lock: Path, in_use: Callable[[str], str]) -> IO[str]:
    """Hold an exclusive lock on the file `lock` and write the holder ("pid N on HOST") into it.

    One mechanism for every writer: `dlma run` locks its directory, each JSONL output its own
    lock file. flock goes with the process, so a killed writer leaves no stale lock; a second
    taker is refused at once with the DlmaError in_use(holder). release_lock gives it back."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DlmaError(in_use(holder)) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {platform.node()}")
    f.flush()
    return f


def release_lock(f: IO[str]) -> None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def writer_lock(path: str | Path) -> Path:
    """The lock file of a JSONL output: hidden, beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def check_not_being_written(path: str | Path) -> None:
    """A file another dlma process is still writing is refused as input: read now, it holds only
    the records written so far (training on 16 of 24 pairs, exit 0)."""
    lock = writer_lock(path)
    if not lock.is_file():
        return
    with open(lock, encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "another process"
            raise DlmaError(f"{path} is still being written by another dlma process ({holder}); "
                            "wait for it to finish") from None


def check_not_input(out: str | Path, inputs: Sequence[Path]) -> None:
    """--out naming an input file would resume "after" every input record: nothing done, exit 0."""
    for src in inputs:
        same = os.path.samefile(src, out) if src.exists() and Path(out).exists() else src.resolve() == Path(out).resolve()
        if same:
            raise DlmaError(f"--out {out} is the input file {src}; write the output to another file")


def named_files(spec: str | None) -> list[str]:
    """The existing files a comma-separated setting names (prompt sources, presets), as named; other
    names (bundled sets and presets, datasets) name no file."""
    return [x.strip() for x in (spec or "").split(",") if x.strip() and Path(x.strip()).is_file()]


def file_hashes(spec: str | None) -> list[list[str]]:
    """[name, sha256 of the content] of each file a setting names: what keys a stage to its inputs'
    content rather than their paths, so an edited file is never taken for the one that was used."""
    out = []
    for p in named_files(spec):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append([p, h.hexdigest()])
    return out


def check_same_inputs(writer: "JsonlWriter", made_from: Callable[[dict], tuple[str, Any]],
                      current: Callable[[str], Any], source: str) -> None:
    """Resume only records made from the input as it is now. made_from(record) gives the key of the
    input record it was made from and what of that input it holds; current(key) gives the same from
    the input now (None: not in the input any more). An input edited since (same id, other text)
    is refused: resuming by id alone kept the old records and said "done"."""
    for lineno, rec in iter_jsonl(writer.path):
        key, held = made_from(rec)
        now = current(key)
        if now is not None and held != now:
            raise DataError(writer.path, lineno, f"record {rec.get(writer.key)!r} was made from {key!r} as it was before "
                            f"{source} was edited; rerun with the input that made it, or choose another --out to start again")


class JsonlWriter:
    """Append-only JSONL output that resumes: `done` holds the ids already written.

    A trailing partial line (from a kill mid-write) is cut off on open, and a write that fails
    (disk full, file-size limit) is undone before the error propagates, so the file always
    holds whole records and a rerun resumes after the last one. The writer holds the file's
    lock from open to close: a second writer of the same file is refused before it reads it
    (two appending at once wrote every record twice).
    """

    def __init__(self, path: str | Path, key: str = "id", fsync_every: int = 0, settings: dict | None = None):
        self.path = Path(path)
        self.key = key
        self.done: set[str] = set()
        self._fsync_every = fsync_every
        self._since_sync = 0
        self._fd: int | None = None
        self._lock = take_lock(writer_lock(self.path), lambda holder: (
            f"{self.path} is being written by another dlma process ({holder}); wait for it to finish or choose another --out"))
        try:
            if self.path.exists():
                self._repair_and_load()
            if settings is not None:
                self._check_settings(settings)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            release_lock(self._lock)
            raise
        self._size = os.fstat(self._fd).st_size

    def _check_settings(self, settings: dict) -> None:
        """Resume only what was made the same way: the settings that shape the records sit in
        OUT.settings.json; an output with records made otherwise is refused, never appended to."""
        side = self.path.with_name(self.path.name + ".settings.json")
        settings = json.loads(json.dumps(settings))
        if self.done and side.is_file():
            old = json.loads(side.read_text(encoding="utf-8"))
            if old != settings:
                diff = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now"
                                 for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
                raise DlmaError(f"{self.path} holds {len(self.done)} records made with other settings ({diff}); "
                                "rerun with those settings to resume it, or choose another --out to start again")
        write_json(side, settings)

    def _repair_and_load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good = data.rfind(b"\n") + 1
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        for lineno, line in enumerate(data[:good].splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.done.add(str(json.loads(line)[self.key]))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise DataError(self.path, lineno, f"existing output is not a dlma record (no `{self.key}`); "
                                "move it away or choose another --out") from None

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            try:  # shrinking a file works on a full disk too
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size = os.fstat(self._fd).st_size
        self.done.add(str(record[self.key]))
        self._since_sync += 1
        if self._fsync_every and self._since_sync >= self._fsync_every:
            os.fsync(self._fd)
            self._since_sync = 0

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
                release_lock(self._lock)

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resume_chunks(items: Iterable[T], size: int, missing: Callable[[T], bool]) -> Iterator[list[T]]:
    """Chunks of `items` fixed by position (not by what is left), for those holding a missing item.

    A resumed stage recomputes a partly written chunk whole and writes only its missing
    records, so every record is computed in the very batch an uninterrupted run computes it
    in: batched float sums round the same way and the output is identical byte for byte.
    `items` may be lazy (a million pairs of one prompt are not listed first).
    """
    it = iter(items)
    while chunk := list(itertools.islice(it, max(1, size))):
        if any(missing(x) for x in chunk):
            yield chunk


def read_jsonl(path: str | Path) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)]


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): a kill never leaves half a file."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write to; it replaces `path` atomically when the block ends,
    so a kill leaves the old file or the new one, and a failed block (a full disk) is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # neither half a file nor a stray temp file
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace a file's text atomically (temp file + rename)."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
