"""Check phrasing files against data/phrasings/SPEC.md.

    python scripts/check_phrasings.py data/phrasings/parts/safety-test-1.jsonl \
        --source src/dlma/resources/safety-test.jsonl [--ids FIRST:LAST]

Exit 1 with one line per problem (file:line, what was expected); exit 0 and a summary otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dlma.data import PHRASINGS  # noqa: E402
WORDS = {"question": (4, 16), "imperative": (4, 22), "polite": (6, 28), "story": (14, 70), "casual": (3, 22)}
POLITE = re.compile(r"^(could|would|can|will|may|might|i was wondering|i'd|i would|if you|do you mind|is it possible|any chance|please)\b", re.I)


def problems(rows: list[tuple[int, dict]], source: dict[str, str]) -> list[str]:
    out = []
    by_request: dict[str, list[tuple[int, dict]]] = {}
    for line, r in rows:
        by_request.setdefault(r.get("request"), []).append((line, r))
        text = r.get("prompt")
        ph = r.get("phrasing")
        where = f"line {line} ({r.get('request')}/{ph})"
        if ph not in PHRASINGS:
            out.append(f"{where}: phrasing must be one of {PHRASINGS}")
            continue
        if not isinstance(text, str) or not text.strip() or text != text.strip():
            out.append(f"{where}: prompt must be a non-empty string without surrounding spaces")
            continue
        n = len(text.split())
        lo, hi = WORDS[ph]
        if r.get("original"):
            if source.get(r.get("request")) != text:
                out.append(f"{where}: marked original but differs from the source prompt")
            continue
        if not lo <= n <= hi:
            out.append(f"{where}: {n} words, {ph} wants {lo}-{hi}")
        if ph == "question" and not text.endswith("?"):
            out.append(f"{where}: a question ends with '?'")
        if ph == "imperative" and text.endswith("?"):
            out.append(f"{where}: an imperative does not end with '?'")
        if ph == "polite" and not POLITE.match(text):
            out.append(f"{where}: polite starts with Could you / Would you / Can you / I was wondering ...")
        if ph == "story" and len(re.findall(r"[.!?](\s|$)", text)) < 2:
            out.append(f"{where}: a story has 2-4 sentences, the request last")
        if ph == "casual" and (text != text.lower() or text.endswith(("?", "."))):
            out.append(f"{where}: casual is all lowercase with no closing '?' or '.'")
    for req, recs in by_request.items():
        if req not in source:
            out.append(f"line {recs[0][0]}: request {req!r} is not an id of the source file")
            continue
        got = [r.get("phrasing") for _, r in recs]
        if sorted(got) != sorted(PHRASINGS):
            out.append(f"line {recs[0][0]}: request {req} has phrasings {got}, wants each of {PHRASINGS} once")
        if sum(bool(r.get("original")) for _, r in recs) != 1:
            out.append(f"line {recs[0][0]}: request {req} needs exactly one record with original: true")
        texts = [r.get("prompt") for _, r in recs]
        if len(set(texts)) != len(texts):
            out.append(f"line {recs[0][0]}: request {req} repeats a prompt text")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--source", type=Path, required=True, help="the JSONL file whose ids the requests name")
    ap.add_argument("--ids", help="FIRST:LAST (1-based, inclusive) positions of the source this file must cover")
    args = ap.parse_args()
    src_rows = [json.loads(x) for x in args.source.read_text(encoding="utf-8").splitlines() if x.strip()]
    source = {r["id"]: r["prompt"] for r in src_rows}
    rows: list[tuple[int, dict]] = []
    errs: list[str] = []
    for f in args.files:
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                errs.append(f"{f}:{i}: not JSON ({e.msg})")
    errs += problems(rows, source)
    if args.ids:
        a, b = (int(x) for x in args.ids.split(":"))
        want = {r["id"] for r in src_rows[a - 1:b]}
        have = {r.get("request") for _, r in rows}
        if want - have:
            errs.append(f"missing {len(want - have)} request(s) of {args.ids}, e.g. {sorted(want - have)[:5]}")
    for e in errs:
        print(e)
    counts = {p: sum(bool(r.get("original")) and r.get("phrasing") == p for _, r in rows) for p in PHRASINGS}
    print(f"{len(rows)} records, {len({r.get('request') for _, r in rows})} requests; originals by phrasing: {counts}; "
          f"{len(errs)} problem(s)", file=sys.stderr)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
