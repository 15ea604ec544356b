"""The log-prob engine: padding/batch invariance and shared-prefix trees equal plain scoring."""

from __future__ import annotations

import pytest

from dlma.logprobs import _plan, collate, pack_rows, plan_tree_batches, score_sequences, score_trees, sequence_logprobs
from dlma.prompts import Renderer, load_preset


def _cases(tok):
    r = Renderer(tok, load_preset("harmless"))
    qs = [[{"role": "user", "content": "How do I pick a lock?"}], [{"role": "user", "content": "Tell me a joke about cats, please."}]]
    resps = [r.response_ids("I can't help with that."), r.response_ids("Sure, here is how you do it step by step", truncated=True)]
    # bare contexts are short: two of them pack into one row beside the long ones
    return [(r.context_ids(q, side), resps) for q in qs for side in ("positive", "negative", "bare")]


def test_trees_equal_plain_scoring_and_batch_one(embedded):
    model, tok = embedded
    trees = _cases(tok)
    flat_c = [c for c, rs in trees for _ in rs]
    flat_r = [x for _, rs in trees for x in rs]
    plain, counts = score_sequences(model, flat_c, flat_r, pad_id=tok.pad_token_id, batch_size=8)
    shared = [x for t in score_trees(model, trees, pad_id=tok.pad_token_id, batch_size=8) for x in t]
    single = [x for t in score_trees(model, trees, pad_id=tok.pad_token_id, batch_size=1, share_prefix=False) for x in t]
    packed = [x for t in score_trees(model, trees, pad_id=tok.pad_token_id, batch_size=8, share_prefix=False) for x in t]
    for p, n, s, o, k in zip(plain, counts, shared, single, packed):
        assert s[1] == n == o[1] == k[1]
        assert abs(p - s[0]) < 1e-2 and abs(p - o[0]) < 1e-2 and abs(p - k[0]) < 1e-2
    # batch of 1 through the differentiable routine agrees too
    b = collate([flat_c[0]], [flat_r[0]], tok.pad_token_id)
    assert abs(float(sequence_logprobs(model, b)[0][0]) - plain[0]) < 1e-2


def test_mixed_precision_trees_close_to_float32(embedded):
    """bf16 body, float32 head: same positions and masks, so only rounding separates it from float32."""
    from dlma.models import load_model

    model, tok = embedded
    bf16, _ = load_model("embedded", "bfloat16", "cpu")
    trees = _cases(tok)
    exact = [x for t in score_trees(model, trees, pad_id=tok.pad_token_id) for x in t]
    mixed = [x for t in score_trees(bf16, trees, pad_id=tok.pad_token_id) for x in t]
    for e, m in zip(exact, mixed):
        assert e[1] == m[1] and abs(e[0] - m[0]) < 1.0  # a wrong position or mask costs 1 to 10


def test_plan_covers_every_tree_once():
    trees = [([1, 2, 3, 4, 5, 6, 7, 8, 9, k], [[1]]) for k in range(5)] + [([k + 50], [[1, 2]]) for k in range(3)]
    batches = plan_tree_batches(trees, batch_size=2, min_prefix=4)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len(b) <= 2 for b in batches)
    assert pack_rows([10, 4, 5, 3]) == [[0], [2, 1], [3]]  # first fit, longest first, rows no longer than 10
    assert pack_rows([10, 4, 5, 3], cap=12) == [[0], [2, 1, 3]]  # a cap above the longest item fills rows up to it
    # one family: every batch of it shares the family's prefix, computed once
    plan = _plan(trees, batch_size=2, max_tokens=None, min_prefix=4)
    assert {L for b, L in plan if b[0] < 5} == {9}


def test_prefix_keys_values_are_kept_across_calls(embedded):
    """A later call finds the shared prefix cached (a shorter one served by slicing a longer one), same numbers."""
    import torch

    from dlma.logprobs import _shared_prefix_cache

    model, tok = embedded
    preset = load_preset("harmless")
    r = Renderer(tok, preset)
    resp = [r.response_ids("I can't help with that."), r.response_ids("Sure, here is how", truncated=True)]
    qs = [f"How do I {verb} a {thing}?" for verb in ("pick", "hotwire") for thing in ("lock", "safe", "car", "truck", "door", "bike")]
    msgs = [[{"role": "user", "content": q}] for q in qs]
    demo = lambda m: preset.demonstrations.index(next(d for d in preset.demonstrations if d[:2] == preset.demos_for(m)))
    by_set: dict[int, list] = {}
    for m in msgs:
        by_set.setdefault(demo(m), []).append(m)
    group = max(by_set.values(), key=len)  # queries sharing one demonstration set
    picks = [m for m in group if "pick" in m[0]["content"]][:2] + [m for m in group if "hotwire" in m[0]["content"]][:1]
    assert len(picks) == 3
    trees = [(r.context_ids(m, "positive"), resp) for m in picks]
    cache = _shared_prefix_cache(model, None)
    cache.items.clear()
    first = score_trees(model, trees[:2], pad_id=tok.pad_token_id, batch_size=8, min_prefix=4)  # "... pick a" prefix
    assert len(cache.items) == 1
    again = score_trees(model, trees[:2], pad_id=tok.pad_token_id, batch_size=8, min_prefix=4)
    mixed = score_trees(model, [trees[0], trees[2]], pad_id=tok.pad_token_id, batch_size=8, min_prefix=4)  # shorter prefix
    assert len(cache.items) == 1 and again == first  # both served from the first call's entry
    plain = score_trees(model, [trees[0], trees[2]], pad_id=tok.pad_token_id, batch_size=8, share_prefix=False)
    for a, b in zip([x for t in mixed for x in t], [x for t in plain for x in t]):
        assert a[1] == b[1] and abs(a[0] - b[0]) < 1e-3
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.0)
    assert not _shared_prefix_cache(model, None).items  # weights changed in place: cache dropped


def test_head_gets_a_contiguous_input(embedded):
    """logits_to_keep slices the hidden states; the head's pre-hook copies the slice so a bf16
    CPU linear does not broadcast its weight per row. The values are those of the full logits."""
    import torch

    model, tok = embedded
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    try:
        ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog")] * 2)
        with torch.inference_mode():
            kept = model(input_ids=ids, logits_to_keep=3).logits
            full = model(input_ids=ids).logits
    finally:
        handle.remove()
    assert seen == [True, True]
    assert torch.allclose(kept, full[:, -3:], atol=1e-4)


def _tiny(kind: str):
    import torch
    from transformers import AutoModelForCausalLM, CohereConfig, GraniteConfig, LlamaConfig

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"cohere": lambda: CohereConfig(logit_scale=0.25, **common),
           "granite": lambda: GraniteConfig(logits_scaling=8.0, **common),
           "llama": lambda: LlamaConfig(**common)}[kind]()
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["cohere", "granite", "llama", "unknown-transform"])
def test_split_head_follows_each_architecture(kind):
    """Scoring splits the output layer off the model; Cohere's logit_scale and Granite's
    logits_scaling are applied, and a model whose forward transforms its logits some other way
    is scored through its own forward. Either way: the model's own log-probs."""

    from dlma.logprobs import _head

    model = _tiny("llama" if kind == "unknown-transform" else kind)
    if kind == "unknown-transform":
        forward = model.forward

        def scaled(*a, **kw):
            out = forward(*a, **kw)
            out.logits = out.logits * 3.0
            return out
        model.forward = scaled
    trees = [([5, 6, 7, 8, 9, 10], [[11, 12, 13], [14, 15]]), ([5, 6, 7, 8, 20], [[21, 22]])]
    flat_c = [c for c, rs in trees for _ in rs]
    flat_r = [r for _, rs in trees for r in rs]
    plain, _ = score_sequences(model, flat_c, flat_r, pad_id=0, batch_size=4)
    split = [x[0] for t in score_trees(model, trees, pad_id=0, batch_size=4, min_prefix=2) for x in t]
    assert split == pytest.approx(plain, abs=1e-3)
    assert (_head(model) is None) == (kind == "unknown-transform")


def test_score_trees_counts_a_cached_prefix_once(embedded):
    """stats["positions"] is the work done: a shared prefix computed once, not once per tree."""
    model, tok = embedded
    prefix = tok("You are a careful assistant. Answer briefly and politely.", add_special_tokens=False)["input_ids"]
    trees = [(prefix + tok(q, add_special_tokens=False)["input_ids"], [tok(a, add_special_tokens=False)["input_ids"]])
             for q, a in (("Hi there", "Hello"), ("What is two plus two", "Four"), ("Name a colour", "Blue"))]
    flat = sum(len(c) + sum(map(len, rs)) for c, rs in trees)
    shared, alone = {}, {}
    score_trees(model, trees, pad_id=tok.pad_token_id, batch_size=8, min_prefix=4, stats=shared)
    score_trees(model, trees, pad_id=tok.pad_token_id, batch_size=8, share_prefix=False, stats=alone)
    assert alone["positions"] == flat
    assert shared["positions"] <= flat - 2 * len(prefix)
    answers = sum(len(r) for _, rs in trees for r in rs)  # only response tokens go through the output layer
    assert shared["head_positions"] == alone["head_positions"] == answers


@pytest.mark.parametrize("tied", [True, False])
def test_forward_flops_count_the_output_layer_only_where_logits_are_used(tied):
    """The input embedding is a lookup; the output layer runs at the positions whose logits are used."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dlma.machine import forward_flops, matmul_params, param_count

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied))
    linears = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    body, head = matmul_params(model)
    assert head == 64 * 32 and body == linears + norms
    assert param_count(model) == body + head * (1 if tied else 2)
    assert forward_flops(model, 10, 3) == 2 * (10 * body + 3 * head)


def test_branch_sums_of_chosen_branches_leave_the_others_at_zero(embedded):
    import torch

    from dlma.logprobs import branch_logits

    model, tok = embedded
    trees = _cases(tok)[:3]
    out = branch_logits(model, [c for c, _ in trees], [rs for _, rs in trees], tok.pad_token_id, "cpu")
    with torch.no_grad():
        every, first = out.sums(), out.sums([0])
        # the taken token's log-prob, read off the whole distribution, sums to the same branch total
        taken = out.distributions(1, 0).gather(-1, torch.tensor(trees[1][1][0]).unsqueeze(-1)).sum()
    assert torch.equal(first[:, 0], every[:, 0]) and not first[:, 1].any() and every[:, 1].ne(0).all()
    # two float32 routes (log_softmax then gather; gather minus logsumexp): 1.6e-4 apart on an AVX2 EPYC
    assert abs(float(taken) - float(every[1, 0])) < 1e-3
