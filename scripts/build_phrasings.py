"""Build the bundled safety sets in five phrasings from the written parts in data/phrasings/.

    python scripts/build_phrasings.py

Every request of the original sets (data/phrasings/originals/, written by
scripts/build_safety_sets.py) exists in the five phrasings of data/phrasings/SPEC.md
(question, imperative, polite, story, casual), one of them the original wording. This checks
each part against the spec (scripts/check_phrasings.py), then writes
src/dlma/resources/{harmful-train,benign-train,safety-val,safety-test}.jsonl with one record per
phrasing, each request's five together in the spec's order:

    {"id": "<request>@<phrasing>", "request": ..., "phrasing": ..., "original": bool,
     "prompt": ..., "label": ..., "category": ...}

A request's phrasings never cross splits, since a request belongs to one split. It also checks
that no held-out phrasing nearly duplicates a training phrasing or a preset demonstration, as
tests/test_safety_sets.py does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from check_phrasings import PHRASINGS, problems  # noqa: E402

DATA = ROOT / "data" / "phrasings"
RES = ROOT / "src" / "dlma" / "resources"
SPLITS = {"harmful-train": ["harmful-train"], "benign-train": ["benign-train"],
          "safety-val": ["safety-val-unsafe", "safety-val-safe"], "safety-test": ["safety-test-unsafe", "safety-test-safe"]}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build(name: str, parts: list[str]) -> list[dict]:
    originals = read(DATA / "originals" / f"{name}.jsonl")
    source = {r["id"]: r["prompt"] for r in originals}
    rows = [(i, r) for p in parts for i, r in enumerate(read(DATA / "parts" / f"{p}.jsonl"), 1)]
    errs = problems(rows, source)
    missing = set(source) - {r["request"] for _, r in rows}
    if errs or missing:
        sys.exit(f"{name}: {len(errs)} problem(s), {len(missing)} request(s) without phrasings; "
                 f"run scripts/check_phrasings.py on its parts\n" + "\n".join(errs[:10]))
    by = {(r["request"], r["phrasing"]): r for _, r in rows}
    out = []
    for o in originals:
        for ph in PHRASINGS:
            r = by[(o["id"], ph)]
            out.append({"id": f"{o['id']}@{ph}", "request": o["id"], "phrasing": ph, "original": bool(r.get("original")),
                        "prompt": r["prompt"], "label": o["label"], "category": o.get("category")})
    return out


def main() -> None:
    from dlma.data import read_prompts
    from dlma.overlap import near_duplicate_index
    from dlma.prompts import list_presets, load_preset

    sets = {name: build(name, parts) for name, parts in SPLITS.items()}
    anchors = [r["prompt"] for n in ("harmful-train", "benign-train") for r in sets[n]]
    anchors += [ex.user for p in list_presets() for demos in load_preset(p).demonstrations for ex in demos]
    anchors += [p.prompt[-1]["content"] for p in read_prompts("hh-harmless-first:train")]
    index = near_duplicate_index(anchors)
    hits = [(held, r["id"], r["prompt"], index.match(r["prompt"])) for held in ("safety-val", "safety-test") for r in sets[held]]
    hits = [h for h in hits if h[3] is not None]
    for h in hits:
        print(f"  {h[0]}: {h[1]} {h[2]!r} ~ {h[3]!r}")
    test = near_duplicate_index(r["prompt"] for r in sets["safety-val"])
    twins = [(r["id"], r["prompt"], test.match(r["prompt"])) for r in sets["safety-test"]]
    twins = [t for t in twins if t[2] is not None]
    for t in twins:
        print(f"  safety-test vs safety-val: {t[0]} {t[1]!r} ~ {t[2]!r}")
    if hits or twins:
        sys.exit(f"{len(hits) + len(twins)} held-out phrasing(s) nearly duplicate a training or validation prompt; "
                 "reword them in the parts")
    for name, rows in sets.items():
        with open(RES / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        labels = {lab: sum(r["label"] == lab for r in rows) // len(PHRASINGS) for lab in ("unsafe", "safe")}
        print(f"{name}.jsonl: {len(rows)} prompts, {len(rows) // len(PHRASINGS)} requests {labels}")


if __name__ == "__main__":
    main()
