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

from dataclasses import dataclass
from typing import Callable, Sequence

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
