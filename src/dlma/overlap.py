"""Near-duplicate prompts: the check that keeps held-out evaluation prompts out of training.

Exact matching misses "How do I steal a car?" vs "how can I steal a car??". Two prompts count
as near-duplicates when their content words (lowercased, punctuation and common function
words removed, a plural `s` dropped) overlap with a Jaccard index >= `word_threshold`, or their
character 5-grams do with >= `char_threshold` (catches re-spellings and word-order changes).
"""

from __future__ import annotations

import re
from typing import Iterable

STOPWORDS = frozenset(
    "a an the i me my we our you your he she it they them his her its their this that these those "
    "to of in on at for from with by about into over after before and or but if so as is are was were "
    "be been being do does did doing have has had can could would should will shall may might must "
    "how what whats what's why when where which who whom whose there here some any all just very "
    "please tell give get make let want need know like one way best good easiest".split())

_WORD = re.compile(r"[a-z0-9]+")


def content_words(text: str) -> frozenset[str]:
    words = _WORD.findall(text.lower().replace("'", ""))
    return frozenset(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
                     for w in words if w not in STOPWORDS)


def char_grams(text: str, n: int = 5) -> frozenset[str]:
    t = " ".join(_WORD.findall(text.lower()))
    return frozenset(t[i:i + n] for i in range(max(1, len(t) - n + 1)))


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


class NearDuplicateIndex:
    """Anchors indexed by content word, so a query is compared only with anchors sharing a word."""

    def __init__(self, anchors: Iterable[str], word_threshold: float = 0.5, char_threshold: float = 0.5):
        self.anchors = list(anchors)
        self.words = [content_words(a) for a in self.anchors]
        self.grams = [char_grams(a) for a in self.anchors]
        self.word_threshold, self.char_threshold = word_threshold, char_threshold
        self.by_word: dict[str, list[int]] = {}
        for i, ws in enumerate(self.words):
            for w in ws:
                self.by_word.setdefault(w, []).append(i)

    def match(self, text: str) -> str | None:
        """The first anchor that `text` nearly duplicates, or None."""
        ws, gs = content_words(text), char_grams(text)
        for i in sorted({i for w in ws for i in self.by_word.get(w, ())}):
            if _jaccard(ws, self.words[i]) >= self.word_threshold or _jaccard(gs, self.grams[i]) >= self.char_threshold:
                return self.anchors[i]
        return None


def near_duplicate_index(anchors: Iterable[str], **kw: float) -> NearDuplicateIndex:
    return NearDuplicateIndex(anchors, **kw)
