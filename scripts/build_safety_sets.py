"""Build the bundled safety prompt sets from the written pools in data/safety-pool/.

    python scripts/build_safety_sets.py

Splits every pool per category (so each split has the same mix) into train / validation /
test with a fixed seed, folds the older hand-written sets in (`safety-eval` into validation,
since earlier defaults were tuned on it; `benign-train` into train), then moves any test or
validation prompt that is a near-duplicate of a training prompt, a demonstration of a
bundled preset or an HH-RLHF training opening into train, so the held-out sets share no
near-duplicate with anything a model is trained on. Writes src/dlma/resources/
{harmful-train,benign-train,safety-val,safety-test}.jsonl. The same check runs in
tests/test_safety_sets.py.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dlma.overlap import near_duplicate_index  # noqa: E402

POOL = ROOT / "data" / "safety-pool"
RES = ROOT / "src" / "dlma" / "resources"
N_TEST, N_VAL = 220, 200  # per label, before folding in the older sets


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_label(rows: list[dict], rng: random.Random) -> tuple[list[dict], list[dict], list[dict]]:
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    order = []
    for cat in sorted(by_cat):  # interleave categories so any prefix is balanced
        rng.shuffle(by_cat[cat])
    while any(by_cat.values()):
        for cat in sorted(by_cat):
            if by_cat[cat]:
                order.append(by_cat[cat].pop())
    test, val, train = [], [], []
    for i, r in enumerate(order):  # round-robin keeps the category mix equal across splits
        (test if len(test) < N_TEST and i % 3 == 0 else val if len(val) < N_VAL and i % 3 == 1 else train).append(r)
    return train, val, test


def main() -> None:
    rng = random.Random(20261127)
    old_eval = read(RES / "safety-eval.jsonl")
    old_benign = read(POOL / "benign-train-original.jsonl")  # the first 50, written before the pools
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for label, files in (("unsafe", ["unsafe-a.jsonl", "unsafe-b.jsonl"]), ("safe", ["safe-a.jsonl", "safe-b.jsonl"])):
        rows = [r for f in files for r in read(POOL / f)]
        tr, va, te = split_label(rows, rng)
        splits["train"] += tr
        splits["val"] += va + [dict(r, category=r.get("category", "safety-eval")) for r in old_eval if r["label"] == label]
        splits["test"] += te
    splits["train"] += [dict(r, category=r.get("category", "benign-train")) for r in old_benign]

    from dlma.data import read_prompts
    from dlma.prompts import list_presets, load_preset

    anchors = [r["prompt"] for r in splits["train"]]
    anchors += [ex.user for name in list_presets() for demo_set in load_preset(name).demonstrations for ex in demo_set]
    anchors += [p.prompt[-1]["content"] for p in read_prompts("hh-harmless-first:train")]
    spill: list[dict] = []
    for held in ("test", "val"):
        index = near_duplicate_index(anchors)
        keep = []
        for r in splits[held]:
            hit = index.match(r["prompt"])
            (spill if hit is not None else keep).append(r)
            if hit is not None:
                print(f"  {held}: {r['prompt']!r} ~ {hit!r}")
        splits[held] = keep
        anchors += [r["prompt"] for r in keep]  # test vs val are disjoint too
    held_out = near_duplicate_index([r["prompt"] for h in ("test", "val") for r in splits[h]])
    moved = [r for r in spill if held_out.match(r["prompt"]) is None]  # never train on a twin of a held-out prompt
    splits["train"] += moved
    print(f"near-duplicates: {len(moved)} moved into train, {len(spill) - len(moved)} dropped")

    names = {"train": None, "val": "safety-val", "test": "safety-test"}
    for split, rows in splits.items():
        if split == "train":
            for label, name in (("unsafe", "harmful-train"), ("safe", "benign-train")):
                out = [r for r in rows if r["label"] == label]
                write(RES / f"{name}.jsonl", out, name)
        else:
            write(RES / f"{names[split]}.jsonl", rows, names[split])


def write(path: Path, rows: list[dict], prefix: str) -> None:
    counts: dict[str, int] = {}
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            rid = r.get("id")
            if not rid or not str(rid).startswith(("unsafe-", "safe-", "benign-")):
                counts[r["label"]] = counts.get(r["label"], 0) + 1
                rid = f"{prefix}-{r['label']}-{counts[r['label']]:03d}"
            f.write(json.dumps({"id": rid, "prompt": r["prompt"], "label": r["label"], "category": r.get("category")},
                               ensure_ascii=False) + "\n")
    labels = {lab: sum(r["label"] == lab for r in rows) for lab in ("unsafe", "safe")}
    print(f"{path.name}: {len(rows)} prompts {labels}")


if __name__ == "__main__":
    main()
