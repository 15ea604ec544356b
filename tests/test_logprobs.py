"""The log-prob engine: padding/batch invariance and shared-prefix trees equal plain scoring."""

from __future__ import annotations

from dlma.logprobs import collate, plan_tree_batches, score_sequences, score_trees, sequence_logprobs
from dlma.prompts import Renderer, load_preset


def _cases(tok):
    r = Renderer(tok, load_preset("harmless"))
    qs = [[{"role": "user", "content": "How do I pick a lock?"}], [{"role": "user", "content": "Tell me a joke about cats, please."}]]
    resps = [r.response_ids("I can't help with that."), r.response_ids("Sure, here is how you do it step by step", truncated=True)]
    return [(r.context_ids(q, side), resps) for q in qs for side in ("positive", "negative")]


def test_trees_equal_plain_scoring_and_batch_one(embedded):
    model, tok = embedded
    trees = _cases(tok)
    flat_c = [c for c, rs in trees for _ in rs]
    flat_r = [x for _, rs in trees for x in rs]
    plain, counts = score_sequences(model, flat_c, flat_r, pad_id=tok.pad_token_id, batch_size=8)
    shared = [x for t in score_trees(model, trees, pad_id=tok.pad_token_id, batch_size=8) for x in t]
    single = [x for t in score_trees(model, trees, pad_id=tok.pad_token_id, batch_size=1, share_prefix=False) for x in t]
    for p, n, s, o in zip(plain, counts, shared, single):
        assert s[1] == n == o[1]
        assert abs(p - s[0]) < 1e-2 and abs(p - o[0]) < 1e-2
    # batch of 1 through the differentiable routine agrees too
    b = collate([flat_c[0]], [flat_r[0]], tok.pad_token_id)
    assert abs(float(sequence_logprobs(model, b)[0][0]) - plain[0]) < 1e-2


def test_plan_covers_every_tree_once():
    trees = [([1, 2, 3, 4, 5, 6, 7, 8, 9, k], [[1]]) for k in range(5)] + [([k + 50], [[1, 2]]) for k in range(3)]
    batches = plan_tree_batches(trees, batch_size=2, min_prefix=4)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len(b) <= 2 for b in batches)
