"""The model as its own text judge: "Response A or B?" read from its next-token probabilities.

RLAIF labels its pairs this way (`dlma score --judge text`), and `dlma evaluate --judge
llm:MODEL` asks the same question about the aligned and the baseline model's answers. The
judging prompt (`judging_prompt`) shows the conversation, Response A, Response B and the
preset's `judge_question`, and asks for one letter. The verdict is the judge's next-token
probabilities of "A" and "B" (what greedy decoding restricted to the two letters would
answer), so it never fails to parse; the probability mass on the two letters says how well a
judge follows the format at all.
"""

from __future__ import annotations

import math
from typing import Sequence

from .data import check_finite
from .errors import DlmaError
from .logprobs import score_trees
from .prompts import Messages, Renderer, as_messages


def conversation_text(prompt: Messages) -> str:
    role = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{role.get(m['role'], m['role'].title())}: {m['content']}" for m in prompt)


def judging_prompt(prompt: Messages, first: str, second: str, question: str, *, allow_tie: bool, max_chars: int = 4000) -> str:
    """The text shown to a pairwise judge (documented in the module docstring)."""
    clip = lambda s: s if len(s) <= max_chars else s[:max_chars] + " [...]"
    ask = "Answer with exactly one of: A, B, tie." if allow_tie else "Answer with a single letter: A or B."
    return (
        "Compare two assistant responses to the same conversation.\n\n"
        f"[Conversation]\n{clip(conversation_text(prompt))}\n\n"
        f"[Response A]\n{clip(first) or '(empty response)'}\n\n"
        f"[Response B]\n{clip(second) or '(empty response)'}\n\n"
        f"{question} {ask}"
    )


class LetterJudge:
    """A causal LM asked "A or B?" by `judging_prompt`, read from its next-token probabilities.

    One judge for both uses, so the accuracy evaluation reports is that of the judge that
    labelled RLAIF's pairs: `score_pairs` gives RLAIF's judge_score for training, `prefer`
    the votes of the evaluation's position-swapped win rates. Each letter's probability sums
    its single-token spellings ("A", " A"), computed by the shared `logprobs.score_trees`.
    """

    def __init__(self, model, tokenizer, question: str, *, name: str = "llm", batch_size: int = 4,
                 max_context: int | None = 2048):
        self.model, self.tok, self.question = model, tokenizer, question
        self.name, self.batch_size = name, batch_size
        self.renderer = Renderer(tokenizer, None, max_context=max_context)
        self.letters = {c: self._spellings(c) for c in ("A", "B")}
        self.note = "probability of the letters A / B after the judging prompt; ties come from position-swap disagreement"

    def _spellings(self, letter: str) -> list[int]:
        ids = {tuple(self.tok(s, add_special_tokens=False)["input_ids"]) for s in (letter, " " + letter)}
        single = sorted(i[0] for i in ids if len(i) == 1)
        if not single:
            raise DlmaError(f"judge tokenizer has no single token for {letter!r}; cannot read a one-letter verdict")
        return single

    def _context(self, prompt: Messages, a: str, b: str) -> list[int]:
        text = judging_prompt(prompt, a, b, self.question, allow_tie=False)
        return self.renderer.context_ids([{"role": "user", "content": text}], "bare")

    def letter_probs(self, queries: Sequence[tuple[Messages, str, str]]) -> list[tuple[float, float]]:
        """P(A), P(B) after the judging prompt of each (prompt, A, B)."""
        a_ids, b_ids = self.letters["A"], self.letters["B"]
        branches = [[i] for i in a_ids + b_ids]
        res = score_trees(self.model, [(self._context(*q), branches) for q in queries], pad_id=self.tok.pad_token_id,
                          batch_size=self.batch_size)
        out = []
        for r in res:
            ps = [math.exp(lp) for lp, _ in r]
            out.append((sum(ps[: len(a_ids)]), sum(ps[len(a_ids):])))
        return out

    def prefer(self, queries):
        out = []
        for pa, pb in self.letter_probs(queries):
            vote = "A" if pa > pb else "B" if pb > pa else "tie"
            out.append({"vote": vote, "lp_a": _log(pa), "lp_b": _log(pb), "mass": pa + pb})
        return out

    def score_pairs(self, pairs: Sequence[dict]) -> list[dict]:
        """Copies of pair records with the verdict on chosen vs rejected, asked in both orders.

        judge_score = mean over both orders of P(chosen's letter) / (P(A) + P(B)), minus 0.5:
        > 0 prefers `chosen`; averaging the orders cancels a constant preference for a position.
        judge_score_calibrated does the same after subtracting, in log-odds, the judge's
        content-free prior (its A-vs-B log-odds with both replies "N/A"), per Zhao et al. 2021.
        judge_mass is the mean probability landing on the answer tokens at all.
        """
        queries = []
        for rec in pairs:
            q = as_messages(rec["prompt"])
            queries += [(q, rec["chosen"], rec["rejected"]), (q, rec["rejected"], rec["chosen"])]
        probs = self.letter_probs(queries + [([{"role": "user", "content": "N/A"}], "N/A", "N/A")])
        pa0, pb0 = probs[-1]
        prior = _log(pa0) - _log(pb0)
        sig = lambda x: 1.0 / (1.0 + math.exp(-x))
        out = []
        for n, rec in enumerate(pairs):
            (pa1, pb1), (pa2, pb2) = probs[2 * n], probs[2 * n + 1]
            lo1, lo2 = _log(pa1) - _log(pb1), _log(pa2) - _log(pb2)  # chosen shown as A, then as B
            o = dict(rec)
            o["judge_score"] = 0.5 * (sig(lo1) + sig(-lo2)) - 0.5
            o["judge_score_calibrated"] = 0.5 * (sig(lo1 - prior) + sig(-(lo2 - prior))) - 0.5
            o["judge_p_a"] = [pa1 / max(pa1 + pb1, 1e-30), pa2 / max(pa2 + pb2, 1e-30)]
            o["judge_mass"] = 0.5 * (pa1 + pb1 + pa2 + pb2)
            o["judge_prior_logodds"] = prior
            check_finite(o, ["judge_score", "judge_score_calibrated", "judge_mass"], "judge")
            out.append(o)
        return out


def _log(p: float) -> float:
    return math.log(max(p, 1e-30))


