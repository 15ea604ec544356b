"""The one exact log-probability routine that generation checks, scoring, training and
evaluation share.

Contexts and responses arrive as separate token-id lists (see prompts.Renderer) and
are concatenated, never re-tokenized as one string. Sequences are right-padded, so the
default position ids 0..n-1 are right for every row and padding only ever sits after
the real tokens, where the causal mask hides it: a row's result does not depend on
what else is in the batch beyond kernel rounding. Log-softmax and the sums are always
taken in float32, from the raw logits (temperature 1, no top-p), whatever the model's
dtype.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

IGNORE = -100


@dataclass
class Batch:
    """Right-padded (context + response) sequences and the response targets to score."""

    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    targets: torch.Tensor         # (B, T): next-token id at response positions, else IGNORE
    keep: int                     # only the last `keep` positions carry targets

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device), self.keep)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def output_cache(res):
    """The key/value cache a forward pass returned: `cache` in transformers 5.x (`past_key_values`
    before it, which 5.x still answers with a deprecation warning)."""
    cache = getattr(res, "cache", None)
    return cache if cache is not None else getattr(res, "past_key_values", None)


def collate(contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Pack (context, response) pairs into one right-padded batch."""
    if len(contexts) != len(responses):
        raise ValueError("contexts and responses differ in length")
    lengths = [len(c) + len(r) for c, r in zip(contexts, responses)]
    T = max(lengths)
    B = len(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    first = T
    for i, (c, r) in enumerate(zip(contexts, responses)):
        if not c:
            raise ValueError("a context must hold at least one token")
        seq = list(c) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        if r:
            # position t predicts token t+1: response token j sits at len(c)+j
            targets[i, len(c) - 1 : len(seq) - 1] = torch.tensor(list(r), dtype=torch.long)
            first = min(first, len(c) - 1)
    keep = max(T - first, 1)
    return Batch(input_ids, attention, targets, keep)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float32 log p(target) at each position (0 where target is IGNORE)."""
    logits = logits.float()
    mask = targets != IGNORE
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    lp = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, lp, torch.zeros_like(lp))


def sequence_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (float32, differentiable) and response token counts per row.

    Calls the model's own forward (so DDP/FSDP wrappers and logit soft-capping work) and
    asks it for logits of the last `keep` positions only: the vocabulary projection over
    context tokens is skipped.
    """
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=batch.keep).logits
        targets = batch.targets[:, -batch.keep:]
    except TypeError:  # models whose forward has no logits_to_keep
        logits = model(**kwargs).logits
        targets = batch.targets
    if logits.shape[1] != targets.shape[1]:
        targets = batch.targets[:, -logits.shape[1]:]
    # logits at position t score target t; targets were laid out shifted in collate.
    lp = token_logprobs(logits, targets)
    return lp.sum(-1), (targets != IGNORE).sum(-1)


def length_buckets(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is small.

    max_tokens caps batch_size x longest length, keeping memory flat for long sequences.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (max_tokens and (len(cur) + 1) * longest > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def score_sequences(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    max_tokens: int | None = 16384,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[float], list[int]]:
    """lp(response | context) for many pairs, length-bucketed, in input order.

    on_batch(n) is called after each batch with the number of sequences done (progress bars).
    """
    n = len(contexts)
    sums: list[float] = [0.0] * n
    counts: list[int] = [0] * n
    device = next(model.parameters()).device
    lengths = [len(c) + len(r) for c, r in zip(contexts, responses)]
    for idx in length_buckets(lengths, batch_size, max_tokens):
        batch = collate([contexts[i] for i in idx], [responses[i] for i in idx], pad_id).to(device)
        s, c = sequence_logprobs(model, batch)
        for j, i in enumerate(idx):
            sums[i] = float(s[j])
            counts[i] = int(c[j])
        if on_batch:
            on_batch(len(idx))
    return sums, counts


# -- shared-prefix scoring (no grad) -------------------------------------------------
# Scoring asks for lp(response | context) for several responses per context, and many
# contexts start with the same tokens (the system prompt and the demonstration set of a
# preset side). score_trees lays each context out once with all its responses as
# branches, packs several such trees into one row where they fit (a block attention mask
# keeps trees and branches from seeing each other, explicit position ids restart every
# branch at the end of its context), and computes the prefix shared by a family of
# contexts once, reusing its KV cache for every row of every batch of that family. The
# decoder body runs in the model's dtype; the head, log-softmax and sums in float32, on
# response positions only. On this 2-core CPU the work is matmul-bound (78% in aten::mm),
# so what pays is computing fewer tokens: benchmarks/score.py measures it.

Tree = tuple[Sequence[int], Sequence[Sequence[int]]]  # (context ids, [response ids, ...])


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _families(trees: Sequence[Tree], min_prefix: int) -> list[tuple[list[int], int]]:
    """Groups of tree indices whose contexts share a prefix, with that prefix's length (0: none).

    Contexts are sorted as token strings, so ones sharing a prefix sit together; a run of
    neighbours sharing at least half the shorter context (and min_prefix tokens) is a
    family. The prefix stops one token short of every member's context so each row still
    holds the context token that predicts the first response token.
    """
    ctx = [list(t[0]) for t in trees]
    order = sorted(range(len(trees)), key=lambda i: ctx[i])
    fams: list[list[int]] = []
    for k, i in enumerate(order):
        a = ctx[order[k - 1]] if k else None
        if a is not None and _lcp(a, ctx[i]) >= max(min_prefix, min(len(a), len(ctx[i])) // 2):
            fams[-1].append(i)
        else:
            fams.append([i])
    out: list[tuple[list[int], int]] = []
    for fam in fams:
        L = min(len(ctx[i]) for i in fam) - 1
        for i in fam[1:]:
            L = min(L, _lcp(ctx[fam[0]], ctx[i]))
        out.append((fam, L if L >= min_prefix else 0))
    return out


def _plan(trees: Sequence[Tree], batch_size: int, max_tokens: int | None, min_prefix: int) -> list[tuple[list[int], int]]:
    """(tree indices, shared prefix length) per batch: families bucketed by suffix-row length."""
    rows = [len(t[0]) + sum(len(r) for r in t[1]) for t in trees]
    batches: list[tuple[list[int], int]] = []
    pool: list[int] = []
    for fam, L in _families(trees, min_prefix):
        if not L or len(fam) == 1:  # a lone context gains nothing from a separate prefix pass
            pool.extend(fam)
            continue
        for b in length_buckets([rows[i] - L for i in fam], batch_size, max_tokens):
            batches.append(([fam[j] for j in b], L))
    if pool:
        batches.extend(([pool[j] for j in b], 0) for b in length_buckets([rows[i] for i in pool], batch_size, max_tokens))
    return batches


def plan_tree_batches(
    trees: Sequence[Tree], batch_size: int, max_tokens: int | None = None, min_prefix: int = 8
) -> list[list[int]]:
    """Batches of tree indices whose contexts share long prefixes and whose rows have similar lengths.

    A family (contexts sharing a prefix) is bucketed by row length inside and pays its
    prefix once, however many batches it spans; contexts sharing nothing are pooled and
    bucketed by length.
    """
    return [b for b, _ in _plan(trees, batch_size, max_tokens, min_prefix)]


class _PrefixCache:
    """KV tensors of recently used shared prefixes (batch 1), keyed by their token ids.

    An entry for tokens t[:P] also serves any t[:L], L < P: with causal attention a
    prefix's keys/values do not depend on what follows, so they are its first L columns.
    """

    def __init__(self, size: int = 32):
        self.size, self.items = size, {}

    def get(self, key):
        kv = self.items.get(key)
        if kv is not None:
            return kv
        L = len(key)
        for k, v in self.items.items():
            if v is not False and len(k) > L and k[:L] == key:
                return [(a[:, :, :L], b[:, :, :L]) for a, b in v]
        return None

    def put(self, key, kv) -> None:
        if len(self.items) >= self.size:
            self.items.pop(next(iter(self.items)))
        self.items[key] = kv


_SHARED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


def _shared_prefix_cache(model: torch.nn.Module, body_dtype) -> _PrefixCache:
    """The prefix cache of this model and body dtype, kept across calls until the weights change in place."""
    try:
        first = next(model.parameters())  # .to() swaps tensors without bumping their version
        version = (sum(p._version for p in model.parameters()), first.data_ptr(), first.dtype, first.device)
        slot = _SHARED.get(model)
        if slot is None or slot[0] != version:
            slot = (version, {})
            _SHARED[model] = slot
    except (RuntimeError, TypeError):  # inference tensors have no version counter; unhashable wrappers
        return _PrefixCache()
    return slot[1].setdefault(str(body_dtype), _PrefixCache())


def pack_rows(lengths: Sequence[int], cap: int | None = None) -> list[list[int]]:
    """First-fit-decreasing packing of items into rows of at most `cap` (default: the longest item).

    Padding every suffix row to the batch's longest nearly doubled the tokens computed on
    generated pairs (20k for 12k real); packed rows cut that to a few percent, and the
    cap bounds how much extra attention a packed row costs.
    """
    cap = max(max(lengths), cap or 0)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(cap - lengths[i])
    return rows


@dataclass
class TreeRows:
    """Packed, right-padded rows of trees (a context and its branches), the layout that scoring
    and training share.

    seg codes each token: -1 padding, 0 a prefix every tree shares held in the row itself, and
    for the tree in row slot s, 1 + s * (n + 1) its context and 1 + s * (n + 1) + 1 + k its
    branch k. picks holds (row, predicting index, target id, tree * n + branch) per target, a
    (targets, 4) long tensor.
    """

    ids: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor
    picks: torch.Tensor
    n: int  # branches per tree (the most any tree has)

    def mask(self, prefix_cols: int = 0, device=None) -> torch.Tensor:
        """Boolean (B, 1, S, prefix_cols + S): causal, the shared prefix (in the row or
        `prefix_cols` of cached keys before it), the token's own tree's context and own branch.
        Built on `device` from the small seg codes (a GPU then never waits for the host to
        build and copy B x S x S elements)."""
        seg = self.seg.to(device) if device is not None else self.seg
        B, S = seg.shape
        si, sj = seg.unsqueeze(2), seg.unsqueeze(1)
        k = self.n + 1
        same_tree = torch.div(si - 1, k, rounding_mode="floor") == torch.div(sj - 1, k, rounding_mode="floor")
        allowed = torch.ones(S, S, dtype=torch.bool, device=seg.device).tril() & (si >= 0) & (sj >= 0)
        allowed &= (sj == 0) | (same_tree & (((sj - 1) % k == 0) | (sj == si)))
        allowed |= torch.eye(S, dtype=torch.bool, device=seg.device)  # padding rows see themselves: no all-masked row
        if prefix_cols:
            allowed = torch.cat([torch.ones(B, S, prefix_cols, dtype=torch.bool, device=seg.device), allowed], dim=2)
        return allowed.unsqueeze(1)


def tree_rows(contexts: Sequence[Sequence[int]], branches: Sequence[Sequence[Sequence[int]]], pad_id: int, *,
              prefix: int = 0, prefix_in_row: bool = False, cap: int | None = None, pack: bool = True) -> TreeRows:
    """Lay trees out in packed rows: each context from token `prefix` on, then its branches.

    The first `prefix` tokens (which every context shares) are either held once at the start of
    each row (prefix_in_row: training, whose gradients reach them) or left out for the caller to
    supply as cached keys (scoring). Positions continue each context's own, so every branch
    sees what it would see in its own (context, branch) sequence. Rows hold at most `cap` tokens
    besides the prefix (default: the longest tree); pack=False: one row per tree.
    """
    if any(not c for c in contexts):
        raise ValueError("a context must hold at least one token")
    n = max(len(b) for b in branches)
    sizes = [len(c) - prefix + sum(map(len, b)) for c, b in zip(contexts, branches)]
    rows = pack_rows(sizes, cap) if pack else [[i] for i in range(len(contexts))]
    head = prefix if prefix_in_row else 0
    S = head + max(sum(sizes[i] for i in row) for row in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), S), dtype=torch.long)
    seg = torch.full((len(rows), S), -1, dtype=torch.long)
    picks: list[torch.Tensor] = []  # one (m, 4) block per branch, not a tuple per token
    for b, row in enumerate(rows):
        if head:
            ids[b, :head] = torch.tensor(list(contexts[row[0]][:head]), dtype=torch.long)
            seg[b, :head], pos[b, :head] = 0, torch.arange(head)
        at = head
        for slot, t in enumerate(row):
            ctx, base = contexts[t], 1 + slot * (n + 1)
            m = len(ctx) - prefix
            ids[b, at:at + m] = torch.tensor(list(ctx[prefix:]), dtype=torch.long)
            seg[b, at:at + m], pos[b, at:at + m] = base, torch.arange(prefix, len(ctx))
            last = at + m - 1  # the context token that predicts every branch's first token
            at += m
            for k, r in enumerate(branches[t]):
                m = len(r)
                if m:
                    ids[b, at:at + m] = torch.tensor(list(r), dtype=torch.long)
                    seg[b, at:at + m], pos[b, at:at + m] = base + 1 + k, torch.arange(len(ctx), len(ctx) + m)
                    block = torch.empty((m, 4), dtype=torch.long)
                    block[:, 0], block[:, 2], block[:, 3] = b, ids[b, at:at + m], t * n + k
                    block[0, 1] = last
                    block[1:, 1] = torch.arange(at, at + m - 1)
                    picks.append(block)
                    at += m
    return TreeRows(ids, pos, seg, torch.cat(picks) if picks else torch.empty((0, 4), dtype=torch.long), n)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


ROW_TOKENS = 2048  # packed rows grow to this length (or the longest tree): attention cost stays small beside the layers


def common_prefix(contexts: Sequence[Sequence[int]], min_prefix: int = 4) -> int:
    """Length of the token prefix every context shares (the chat template's system turn), leaving
    each context at least one token of its own; 0 when shorter than min_prefix."""
    n = min([min(map(len, contexts)) - 1] + [_lcp(contexts[0], c) for c in contexts[1:]])
    return n if n >= min_prefix else 0


class Positions(NamedTuple):
    """Token positions a forward computed through the decoder body, and how many of them also went
    through the output layer (what its FLOPs are counted from: machine.forward_flops)."""

    body: int
    head: int


@dataclass
class BranchLogits:
    """Logits (float, differentiable) at every position that predicts a branch token, one row
    per target of `tree_rows`' picks, with whose branch each target is (tree * n + branch)."""

    logits: torch.Tensor  # (targets, vocab)
    target: torch.Tensor  # (targets,)
    owner: torch.Tensor   # (targets,)
    n: int                # branches per tree
    trees: int
    positions: int        # positions computed

    @property
    def work(self) -> Positions:
        """The positions computed, and those that went through the output layer (one per target)."""
        return Positions(self.positions, len(self.target))

    def sums(self, branches: Sequence[int] | None = None) -> torch.Tensor:
        """Summed float32 log-probs (trees, n) of every branch, or of `branches` only (the others
        0): a branch used for its distributions alone need not be log-softmaxed twice."""
        logits, target, owner = self.logits, self.target, self.owner
        if branches is not None:
            at = torch.nonzero(torch.isin(owner % self.n, torch.tensor(list(branches), device=owner.device))).squeeze(-1)
            logits, target, owner = logits[at], target[at], owner[at]
        lp = token_logprobs(logits, target)
        sums = torch.zeros(self.trees * self.n, dtype=lp.dtype, device=lp.device).index_add(0, owner, lp)
        return sums.view(self.trees, self.n)

    def distributions(self, tree: int, branch: int) -> torch.Tensor:
        """Float32 log-softmax (len(branch), vocab) of the next token at each of that branch's
        positions, in order: the whole distribution, for a KL term, not only the taken token's."""
        at = torch.nonzero(self.owner == tree * self.n + branch).squeeze(-1)
        return self.logits[at].float().log_softmax(-1)


def branch_logits(model, contexts: Sequence[list[int]], branches: Sequence[Sequence[list[int]]], pad_id: int,
                  device, *, pack: bool = True, row_tokens: int = ROW_TOKENS) -> BranchLogits:
    """One forward of N responses per example that share their context (see `branch_logprobs`),
    kept as the logits of the predicting positions so callers can take sums or distributions."""
    P = common_prefix(contexts) if pack and all(contexts) else 0
    rows = tree_rows(contexts, branches, pad_id, prefix=P, prefix_in_row=True, cap=row_tokens - P, pack=pack)
    mask = rows.mask(device=device)
    # Under DDP `model` is the wrapper, whose config is its module's: eager attention adds the
    # mask to the scores, so a boolean mask must become an additive one there too.
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        mask = additive(mask, torch.float32)
    row_of, at_of, target, owner = rows.picks.to(device).t().contiguous()  # contiguous columns: searchsorted copies others
    keep = torch.unique(at_of)  # sorted: the positions whose logits any response needs
    col = torch.searchsorted(keep, at_of)
    logits = model(input_ids=rows.ids.to(device), attention_mask=mask, position_ids=rows.pos.to(device),
                   use_cache=False, logits_to_keep=keep).logits
    picked = logits[row_of, col]
    return BranchLogits(picked, target, owner, rows.n, len(contexts), int((rows.seg >= 0).sum()))


def branch_logprobs(model, contexts: Sequence[list[int]], branches: Sequence[Sequence[list[int]]], pad_id: int,
                    device, *, pack: bool = True, row_tokens: int = ROW_TOKENS) -> tuple[torch.Tensor, int]:
    """Differentiable summed log-probs (B, N) of N responses per example that share their context.

    The prefix all contexts share (`common_prefix`: the system turn of a chat template) is
    computed once per row; each example follows with the rest of its context and then its
    responses, packed without padding into rows of up to `row_tokens` (`tree_rows`). Every sum
    equals the (context, response) row of `sequence_logprobs` up to kernel rounding, and so do
    the gradients (the prefix's sums every example's). Goes through the model's own forward
    (DDP/FSDP wrappers keep working); only the predicting positions go through the output layer,
    float32 log-softmax as everywhere here. Also returns the positions computed. pack=False: one
    padded row per example, nothing shared between examples (the layout before packing;
    benchmarks compare).
    """
    out = branch_logits(model, contexts, branches, pad_id, device, pack=pack, row_tokens=row_tokens)
    return out.sums(), out.positions


class _Projection:
    """The output layer split off a causal LM, in float32, with the architecture's own logit
    transform: Gemma 2/3 soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module):
        cfg = model.config
        self.weight = head.weight.float()
        self.bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.scale = float(getattr(cfg, "logit_scale", None) or 1.0) / float(getattr(cfg, "logits_scaling", None) or 1.0)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        logits = h.float() @ self.weight.T
        if self.bias is not None:
            logits = logits + self.bias
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@torch.inference_mode()
def _agrees_with_forward(model: torch.nn.Module, proj: _Projection) -> bool:
    """The split-off head gives the model's own logits on a probe sequence (an architecture
    with another output transform fails this and is scored through its own forward)."""
    device = next(model.parameters()).device
    vocab = int(proj.weight.shape[0])
    ids = torch.arange(1, 9, device=device).clamp(max=vocab - 1).unsqueeze(0)
    own = model(input_ids=ids, use_cache=False).logits[0].float()
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
    mine = proj(hidden)
    return own.shape == mine.shape and bool(torch.allclose(own, mine, rtol=1e-2, atol=1e-2 * (1 + float(own.abs().max()))))


def _head(model: torch.nn.Module) -> _Projection | None:
    """The float32 output projection, or None when it can't be split off or doesn't reproduce
    the model's logits (checked once per model)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model or not hasattr(head, "weight"):
        return None
    proj = _Projection(model, head)
    verdict = getattr(model, "_dlma_head_ok", None)
    if verdict is None:
        verdict = _agrees_with_forward(model, proj)
        try:
            model._dlma_head_ok = verdict
        except (AttributeError, TypeError):
            pass
    return proj if verdict else None


@torch.inference_mode()
def score_trees(
    model: torch.nn.Module,
    trees: Sequence[Tree],
    *,
    pad_id: int,
    batch_size: int = 8,
    max_tokens: int | None = 16384,
    share_prefix: bool = True,
    min_prefix: int = 8,
    head_chunk: int = 1024,
    body_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
    stats: dict | None = None,
) -> list[list[tuple[float, int]]]:
    """lp(response | context) and token counts for every branch of every (context, responses) tree.

    Exact up to kernel rounding: the same numbers as scoring each (context, response)
    alone with sequence_logprobs (float32 batch-1 vs batched differ by ~1e-4 on a sum).
    Falls back to plain per-sequence scoring for models whose head can't be split off.
    body_dtype (e.g. torch.bfloat16 with a float32 model) runs the decoder body under
    autocast in that dtype, keeping the residual stream, head and log-softmax in float32.
    stats["positions"] (when given) grows by the token positions the model computed: a shared
    prefix read from the cache is not computed again, so it counts once (what MFU divides);
    stats["head_positions"] by those that went through the output layer (response tokens).
    """
    stats = stats if stats is not None else {}
    stats.setdefault("positions", 0)
    stats.setdefault("head_positions", 0)
    out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(t[1]) for t in trees]
    for t in trees:
        if not t[0]:
            raise ValueError("a context must hold at least one token")
    head = _head(model)
    if head is None:
        flat = [(i, k) for i, t in enumerate(trees) for k in range(len(t[1]))]
        sums, counts = score_sequences(model, [trees[i][0] for i, _ in flat], [trees[i][1][k] for i, k in flat],
                                       pad_id=pad_id, batch_size=batch_size, max_tokens=max_tokens)
        for (i, k), s, c in zip(flat, sums, counts):
            out[i][k] = (s, c)
        stats["positions"] += sum(len(trees[i][0]) + len(trees[i][1][k]) for i, k in flat)
        stats["head_positions"] += sum(len(trees[i][1][k]) for i, k in flat)
        if on_batch:
            on_batch(len(trees))
        return out
    base = model.base_model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = _shared_prefix_cache(model, body_dtype)  # across calls; a prefix's KV depends on body_dtype
    from transformers import DynamicCache

    # transformers 5.x renamed `past_key_values` to `cache` in some models' forward
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    for idx, L in _plan(trees, batch_size, max_tokens, min_prefix if share_prefix else 1 << 30):
        group = [trees[i] for i in idx]
        kv = None
        if L:
            key = tuple(group[0][0][:L])
            kv = cache.get(key)
            if kv is None:
                with torch.autocast(device.type, dtype=body_dtype or torch.bfloat16, enabled=body_dtype is not None):
                    res = base(input_ids=torch.tensor([list(key)], device=device), use_cache=True)
                layers = output_cache(res).layers
                if any(getattr(layer, "is_sliding", False) for layer in layers):
                    kv = False  # sliding-window caches can't be shared this way
                else:
                    kv = [(layer.keys, layer.values) for layer in layers]
                cache.put(key, kv)
                stats["positions"] += L
            if kv is False:
                L, kv = 0, None
        lay = tree_rows([t[0] for t in group], [t[1] for t in group], pad_id, prefix=L)
        ids, pos, picks, n = lay.ids, lay.pos, lay.picks, lay.n
        stats["positions"] += int((lay.seg >= 0).sum())
        stats["head_positions"] += len(picks)
        mask = additive(lay.mask(L, device=device), dtype)
        past = None
        if kv is not None:
            B = ids.shape[0]
            past = DynamicCache([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv], config=model.config)
        kw = {cache_arg: past} if past is not None else {}
        with torch.autocast(device.type, dtype=body_dtype or torch.bfloat16, enabled=body_dtype is not None):
            hidden = base(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                          use_cache=past is not None, **kw).last_hidden_state
        if len(picks):
            rows, cols, tgt, owner = picks.to(device).t().contiguous()
            lps = []
            for s in range(0, len(picks), head_chunk):
                logits = head(hidden[rows[s:s + head_chunk], cols[s:s + head_chunk]])
                lps.append(logits.gather(-1, tgt[s:s + head_chunk, None]).squeeze(-1) - torch.logsumexp(logits, -1))
            # float64 sums in pick order (on a CPU the same additions as a Python loop), one copy to the host
            sums = torch.zeros(len(group) * n, dtype=torch.float64, device=device).index_add_(0, owner, torch.cat(lps).double())
            counts = torch.bincount(owner, minlength=len(group) * n)
            for o, (s_, n_) in enumerate(zip(sums.cpu().tolist(), counts.cpu().tolist())):
                if n_:
                    t, k = divmod(o, n)
                    out[idx[t]][k] = (s_, n_)
        if on_batch:
            on_batch(len(idx))
    return out
