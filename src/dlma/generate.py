"""Contrastive generation: sample o+ under p+ and o- under p- for every prompt.

Sampling goes through a small backend interface (transformers here, vLLM for GPU
users) that takes context token ids and returns sampled ids plus the raw log-prob of
every sampled token: log-softmax of the unprocessed logits, whatever temperature or
top-p shaped the sampling. Those sums are lp(o+|p+) and lp(o-|p-), two of the four
terms of the self-rewarding score, so the scorer can reuse them.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from .config import GenerateConfig, ModelConfig, SamplingConfig
from .data import (JsonlWriter, PromptRecord, ReadStats, check_not_input, check_same_inputs, column_map, file_hashes,
                   named_files, pair_digest, read_prompts, resume_chunks)
from .pairfile import conversational, upgrade_before_append
from .errors import DlmaError
from .logprobs import length_buckets, output_cache, score_trees
from .machine import forward_flops
from .models import load_model, load_tokenizer, resolve_model_path
from .prompts import Renderer, context_room, end_of_turn_id, load_preset, source_presets
from .tracking import Tracking, Where, typed_settings


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0


@dataclass
class Sample:
    ids: list[int]        # sampled tokens, without the stop token
    logprob: float        # raw log-prob sum of the sampled tokens, stop token included when finished
    finished: bool        # ended with a stop token (else cut at max_new_tokens)
    stop_id: int | None = None  # the stop token that ended it


class Backend(Protocol):
    """What generation needs from an engine. Callers never see the engine itself."""

    name: str

    def sample(self, contexts: Sequence[Sequence[int]], params: SamplingParams,
               seeds: Sequence[int] | None = None) -> list[Sample]: ...


SAMPLER = "row-seeded"  # recorded with every file sampled this way: a file sampled otherwise is not resumed into


def row_seed(*parts: object) -> int:
    """A sampling seed from a row's own identity (run seed, pair id, side): the tokens a row
    gets do not depend on which rows share its batch, so a resumed or re-batched run samples
    what an uninterrupted one does."""
    return zlib.crc32(":".join(map(str, parts)).encode())


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class _PrefixKV:
    """Keys/values (batch 1, model dtype) of recently used context prefixes, keyed by their token ids.

    A prefix's KV does not depend on what follows it (causal attention), so an entry for
    tokens t[:P] serves any context that starts with t[:m], m <= P: the first m columns.
    """

    def __init__(self, size: int = 32):
        self.size = size
        self.items: "OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]" = OrderedDict()

    def best(self, ctx: Sequence[int]) -> tuple[tuple[int, ...] | None, int]:
        """The entry sharing the longest prefix with ctx, and that length."""
        key, n = None, 0
        for k in self.items:
            m = _lcp(k, ctx)
            if m > n:
                key, n = k, m
        return key, n

    def get(self, key: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key: tuple[int, ...], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.items[key] = kv
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def clear(self) -> None:
        self.items.clear()


class TemperatureTopP:
    """Temperature then top-p (nucleus) filtering, giving exactly transformers' result without its full sort.

    transformers' TopPLogitsWarper sorts the whole vocabulary at every step (on a CPU
    that was a fifth of sampling time). The kept set is decided here from the top-k
    logits (k grown until they cover top_p); wherever a token's cumulative probability
    lies within `margin` of the threshold, or tied logits straddle it, or k reaches the
    vocabulary, that row falls back to transformers' own warper, so the filtered scores,
    hence the sampled tokens and the random numbers drawn, are the same bit for bit.
    """

    def __init__(self, temperature: float, top_p: float, k: int = 64, margin: float = 1e-4):
        from transformers.generation.logits_process import TopPLogitsWarper

        self.temperature, self.top_p, self.k, self.margin = temperature, top_p, k, margin
        self.exact = TopPLogitsWarper(top_p=top_p) if top_p < 1.0 else None
        self.fallbacks = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = scores / self.temperature  # as TemperatureLogitsWarper
        if self.exact is None:
            return s
        V = s.shape[-1]
        k = min(self.k, V)
        p = s.softmax(-1)
        while True:
            top, idx = s.topk(k, dim=-1)
            probs = p.gather(-1, idx).double()
            excl = probs.cumsum(-1) - probs  # probability mass above each candidate
            if k == V or bool((excl[:, -1] >= self.top_p + self.margin).all()):
                break
            k = min(V, k * 8)
        keep = excl < self.top_p  # transformers drops a token when the mass at or below it is <= 1 - top_p
        last = keep.sum(-1, keepdim=True) - 1  # kept tokens are ranks 0..last (excl only grows)
        nxt = (last + 1).clamp(max=k - 1)
        near = ((excl - self.top_p).abs() <= self.margin).any(-1)  # too close to call: transformers decides
        near |= (last + 1 >= k).view(-1)  # the top k don't cover top_p
        near |= (top.gather(-1, last) == top.gather(-1, nxt)).view(-1) & (last + 1 < k).view(-1)  # a tie straddles it
        remove = torch.ones_like(s, dtype=torch.bool).scatter_(-1, idx, ~keep)
        out = s.masked_fill(remove, -float("inf"))
        if bool(near.any()):  # the warper is row-wise: only the rows too close to call pay its full sort
            self.fallbacks += 1
            out[near] = self.exact(input_ids[near], s[near])
        return out


class RowSampler:
    """Draws each row's next token with the row's own generator, after temperature/top-p.

    transformers samples a batch from one global stream, so a row's tokens depend on the rows
    beside it. This processor samples every row itself and leaves a single finite score,
    which transformers' own draw then has to pick.
    """

    def __init__(self, warp: "TemperatureTopP", seeds: Sequence[int]):
        self.warp = warp
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Inverse-CDF draw, all rows at once: one uniform per row from its generator. A token
        # of probability 0 spans an empty interval of the CDF and is never picked.
        # (torch.multinomial called once per row over the whole vocabulary was much slower.)
        # Only the B uniforms come from the host; the CDF stays where the scores are (a GPU's
        # [B, vocab] float64 CDF is ~25 MB a step to copy out at batch 64).
        cdf = self.warp(input_ids, scores).double().softmax(-1).cumsum(-1)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.gens]).to(cdf.device)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=cdf.shape[1] - 1)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(-1, picks, 0.0)


# generation-config fields that make `generate` add a logits processor even to greedy decoding
_PROCESSOR_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
                     "min_length", "min_new_tokens", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id",
                     "suppress_tokens", "begin_suppress_tokens", "exponential_decay_length_penalty",
                     "renormalize_logits", "guidance_scale", "watermarking_config", "forced_decoder_ids")


def _plain_greedy(model) -> bool:
    """True when `generate` would apply no processor of the model's own to greedy decoding."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return True
    neutral = {"repetition_penalty": 1.0, "min_length": 0, "min_new_tokens": 0, "no_repeat_ngram_size": 0,
               "encoder_no_repeat_ngram_size": 0, "renormalize_logits": False, "guidance_scale": 1.0}
    return all(getattr(gc, f, None) in (None, neutral.get(f)) for f in _PROCESSOR_FIELDS)


class TransformersBackend:
    """Batched sampling with `model.generate`, left-padded, length-bucketed.

    prefix_cache: contexts that share a long prefix (the system turn and the few-shot
    demonstrations of a preset side) have that prefix's keys/values computed once, kept
    across calls, and copied into each batch's cache, so only the rest of each context is
    prefilled. Batches, padding, position ids and the sampling loop are those of the plain
    path, so greedy and seeded sampling give the same tokens (up to kernel rounding of the
    prefix's keys/values, which are computed in a batch of one). The cache is dropped when
    the model's weights change in place (training).

    lean: decode with dlma's own loop over a preallocated (static) key/value cache instead of
    `model.generate`: the same forward calls, padding and selection rule, without the cache's
    per-step concatenation, the stored logits of every step and generate's per-step
    bookkeeping. Used where the model's generation config adds no logits processor of its
    own (else, or if the model refuses a static cache, `generate` runs); tests check that both
    give the same tokens.
    """

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = 16, prefix_cache: bool = True, *,
                 min_prefix: int = 16, cache_size: int = 32, lean: bool = True):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.lean = lean and _plain_greedy(model)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {end_of_turn_id(tokenizer)}
        self.stop_ids.discard(None)
        self.prefix_cache = prefix_cache
        self.fast_top_p = True
        self.min_prefix = min_prefix
        self.prefixes = _PrefixKV(cache_size)
        self.stats = {"context_tokens": 0, "prefilled_tokens": 0, "prefix_tokens": 0, "new_tokens": 0}
        self._weights_version = None
        self._cache_arg: str | None = None
        self._usable: bool | None = None  # False for caches that can't be shared (sliding windows)

    def _warper(self, params: SamplingParams):
        """The exact fast temperature + top-p step, where it applies (else transformers' own warpers)."""
        if not self.fast_top_p or params.temperature <= 0 or params.temperature == 1.0 or not 0 < params.top_p < 1:
            return None
        return TemperatureTopP(params.temperature, params.top_p)

    # -- shared prefixes ---------------------------------------------------------------
    def _check_weights(self) -> None:
        try:
            first = next(self.model.parameters())  # .to() swaps tensors without bumping their version
            v = (sum(p._version for p in self.model.parameters()), first.data_ptr(), first.dtype, first.device)
        except RuntimeError:  # inference tensors have no version counter: keep nothing across calls
            v = -1 if self._weights_version != -1 else -2
        if v != self._weights_version:
            self.prefixes.clear()
            self._weights_version = v

    def _prefix_kv(self, key: tuple[int, ...], device) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        base = getattr(self.model, "base_model", None) or self.model
        kw = dict(input_ids=torch.tensor([list(key)], device=device), use_cache=True)
        res = base(**kw)
        cache = output_cache(res)
        layers = getattr(cache, "layers", None)
        if layers is None or any(getattr(layer, "is_sliding", False) for layer in layers) \
                or any(getattr(layer, "keys", None) is None for layer in layers):
            self._usable = False
            return None
        self._usable = True
        kv = [(layer.keys, layer.values) for layer in layers]
        self.prefixes.put(key, kv)
        return kv

    def _plan_prefixes(self, contexts: Sequence[Sequence[int]], device) -> list[tuple[tuple[int, ...] | None, int]]:
        """(cache key, usable prefix length) per context; computes missing shared prefixes.

        Contexts sharing at least min_prefix tokens and half the shorter one form a
        family; a family (two or more rows, repeats included) whose common prefix the
        cache does not already hold (to within min_prefix tokens) gets it computed once.
        The usable length stops one token short of the context, so every row still
        prefills the token whose logits give the first sampled token.
        """
        uniq = sorted({tuple(c) for c in contexts})
        rows = {u: 0 for u in uniq}
        for c in contexts:
            rows[tuple(c)] += 1
        cover = {u: self.prefixes.best(u) for u in uniq}
        fams: list[list[tuple[int, ...]]] = []
        for k, u in enumerate(uniq):
            a = uniq[k - 1] if k else None
            if a is not None and _lcp(a, u) >= max(self.min_prefix, min(len(a), len(u)) // 2):
                fams[-1].append(u)
            else:
                fams.append([u])
        for fam in fams:
            if sum(rows[u] for u in fam) < 2:
                continue
            L = min(len(u) for u in fam) - 1
            for u in fam[1:]:
                L = min(L, _lcp(fam[0], u))
            if L < self.min_prefix or L - min(min(cover[u][1], len(u) - 1) for u in fam) < self.min_prefix:
                continue
            key = fam[0][:L]
            if self._prefix_kv(key, device) is None:
                return [(None, 0)] * len(contexts)
            for u in fam:
                if cover[u][1] < L:
                    cover[u] = (key, L)
        plan = []
        for c in contexts:
            key, n = cover[tuple(c)]
            n = min(n, len(c) - 1)
            usable = key is not None and n >= self.min_prefix and key in self.prefixes.items
            plan.append((key, n) if usable else (None, 0))
        return plan

    def _batch_cache(self, plan, idx, lengths, T: int):
        """Per layer (keys, values) holding each row's prefix in its left-padded columns, and their length C."""
        C = min(T - lengths[i] + plan[i][1] for i in idx)
        if C < self.min_prefix:
            return None, 0
        entries = [self.prefixes.get(plan[i][0]) if plan[i][0] is not None else None for i in idx]
        first = next(e for e in entries if e is not None)
        layers = []
        for li, (k0, v0) in enumerate(first):
            K = k0.new_zeros((len(idx), k0.shape[1], C, k0.shape[3]))
            V = v0.new_zeros((len(idx), v0.shape[1], C, v0.shape[3]))
            for j, (i, e) in enumerate(zip(idx, entries)):
                off = T - lengths[i]
                n = C - off
                if n > 0:  # n <= plan[i][1], so e is an entry here
                    K[j, :, off:C] = e[li][0][0, :, :n]
                    V[j, :, off:C] = e[li][1][0, :, :n]
            layers.append((K, V))
        return layers, C

    def _generate(self, ids, mask, prefix, params: SamplingParams, warp, greedy: bool, rows: bool):
        """`model.generate` on one left-padded batch: (new tokens [B, n], raw log-probs of them [B, n]), on the CPU."""
        from transformers import DynamicCache, LogitsProcessorList

        T = ids.shape[1]
        cache = DynamicCache(prefix, config=self.model.config) if prefix is not None else None
        gen = self.model.generate(
            input_ids=ids, attention_mask=mask,
            # RowSampler leaves one finite score per row: greedy decoding takes it, without
            # transformers' own draw (a multinomial over the whole vocabulary every step)
            max_new_tokens=params.max_new_tokens, do_sample=not (greedy or rows),
            temperature=None if greedy or rows else (1.0 if warp else params.temperature),
            top_p=None if greedy or rows else (1.0 if warp else params.top_p), top_k=None,
            **({"logits_processor": LogitsProcessorList([warp])} if warp else {}),
            pad_token_id=self.tok.pad_token_id, eos_token_id=sorted(self.stop_ids),
            output_logits=True, return_dict_in_generate=True,
            **({self._cache_arg: cache} if cache is not None else {}),
        )
        new = gen.sequences[:, T:].cpu()
        # raw logits of each step, before temperature/top-p processing
        raw = torch.stack(gen.logits, dim=1).float()
        lps = torch.gather(raw.log_softmax(-1), -1, new[:, : raw.shape[1]].unsqueeze(-1).to(raw.device)).squeeze(-1).cpu()
        return new, lps

    def _decode(self, ids, mask, prefix, C: int, params: SamplingParams, warp):
        """What `_generate` computes for greedy or row-sampled decoding, in dlma's own loop.

        Same forward calls as generate (prefill of the columns after the shared prefix, then one
        token per step, finished rows fed the pad token, stop when every row has stopped), but
        the keys/values live in a cache allocated once for the whole answer, and only the raw
        log-prob of each chosen token is kept, not every step's logits.
        """
        from transformers import StaticCache

        B, T = ids.shape
        N = params.max_new_tokens
        static = StaticCache(config=self.model.config, max_cache_len=T + N)
        if any(getattr(layer, "is_sliding", False) for layer in static.layers):
            raise ValueError("sliding-window attention layers")  # their rolling caches: left to generate
        if prefix is not None:  # the shared prefixes, already in place in their left-padded columns
            for layer, (K, V) in zip(static.layers, prefix):
                layer.lazy_initialization(K, V)
                layer.keys[:, :, :C] = K
                layer.values[:, :, :C] = V
                layer.cumulative_length.fill_(C)
        # a static cache attends over all T + N columns: those not yet written are masked
        full = torch.cat([mask, mask.new_zeros((B, N))], 1)
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        stops = torch.tensor(sorted(self.stop_ids), device=ids.device)
        pad = self.tok.pad_token_id
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        seq, toks, lps = ids, [], []
        inp, p, cpos = ids[:, C:], pos[:, C:], torch.arange(C, T, device=ids.device)
        for t in range(N):
            out = self.model(input_ids=inp, attention_mask=full, position_ids=p, **{self._cache_arg: static},
                             cache_position=cpos, use_cache=True, logits_to_keep=1)
            raw = out.logits[:, -1].float()
            scores = warp(seq, raw) if warp is not None else raw
            nxt = scores.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            lps.append(raw.log_softmax(-1).gather(-1, nxt[:, None])[:, 0])
            toks.append(nxt)
            done |= torch.isin(nxt, stops)
            if bool(done.all()) or t == N - 1:
                break
            full[:, T + t] = 1
            seq = torch.cat([seq, nxt[:, None]], 1)
            inp, p, cpos = nxt[:, None], pos[:, -1:] + t + 1, torch.tensor([T + t], device=ids.device)
        return torch.stack(toks, 1).cpu(), torch.stack(lps, 1).cpu()

    @torch.inference_mode()
    def sample(self, contexts: Sequence[Sequence[int]], params: SamplingParams,
               seeds: Sequence[int] | None = None) -> list[Sample]:
        """Sample each context; with `seeds` (one per context) every row draws from its own
        generator, else the batch draws from torch's global stream (seed it before calling)."""
        out: list[Sample | None] = [None] * len(contexts)
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id
        lengths = [len(c) for c in contexts]
        plan = [(None, 0)] * len(contexts)
        if self.prefix_cache and self._usable is not False:
            self._check_weights()
            plan = self._plan_prefixes(contexts, device)
        if self._cache_arg is None:
            import inspect

            fwd = inspect.signature(self.model.forward).parameters
            self._cache_arg = "cache" if "cache" in fwd else "past_key_values"
        for idx in length_buckets(lengths, self.batch_size):
            T = max(lengths[i] for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for j, i in enumerate(idx):  # left padding: generation appends on the right
                ids[j, T - len(contexts[i]):] = torch.tensor(list(contexts[i]))
                mask[j, T - len(contexts[i]):] = 1
            prefix, C = self._batch_cache(plan, idx, lengths, T) if any(plan[i][0] for i in idx) else (None, 0)
            self.stats["context_tokens"] += sum(lengths[i] for i in idx)
            self.stats["prefilled_tokens"] += len(idx) * (T - C)
            self.stats["prefix_tokens"] += len(idx) * C
            greedy = params.temperature <= 0
            rows = seeds is not None and not greedy

            def processor():  # fresh per attempt: a RowSampler's generators advance as it draws
                warp = None if greedy else self._warper(params)
                if rows:
                    warp = RowSampler(warp or TemperatureTopP(params.temperature, params.top_p), [seeds[i] for i in idx])
                return warp

            new = None
            if self.lean and (greedy or rows):
                try:
                    new, lps = self._decode(ids.to(device), mask.to(device), prefix, C, params, processor())
                except (TypeError, ValueError, NotImplementedError) as exc:  # no static cache for this model
                    self.lean = False
                    warnings.warn(f"dlma's decoding loop does not fit this model ({exc}); using model.generate")
            if new is None:
                new, lps = self._generate(ids.to(device), mask.to(device), prefix, params, processor(), greedy, rows)
            for j, i in enumerate(idx):
                toks, total, stop = [], 0.0, None
                for t, tid in enumerate(new[j].tolist()):
                    total += float(lps[j, t])
                    if tid in self.stop_ids:
                        stop = tid
                        break
                    toks.append(tid)
                self.stats["new_tokens"] += len(toks) + int(stop is not None)
                out[i] = Sample(toks, total, stop is not None, stop)
        return out  # type: ignore[return-value]


class VLLMBackend:
    """Sampling through vLLM (GPU users). Asks vLLM for raw log-probs of sampled tokens."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, dtype: str = "auto", **engine_kw):
        try:
            from vllm import LLM
        except ImportError:
            raise DlmaError("backend vllm needs vLLM: pip install vllm (GPU machines)") from None
        self.tok = tokenizer
        self.stop_ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)} - {None}
        self.llm = LLM(model=model_path, dtype=dtype, logprobs_mode="raw_logprobs", **engine_kw)

    def sample(self, contexts: Sequence[Sequence[int]], params: SamplingParams,
               seeds: Sequence[int] | None = None) -> list[Sample]:
        from vllm import SamplingParams as VSP

        def sp(seed: int) -> "VSP":
            return VSP(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                       seed=seed, logprobs=0, stop_token_ids=sorted(self.stop_ids))

        # vLLM seeds each request on its own: per-row seeds map straight onto it
        sps = [sp(int(x)) for x in seeds] if seeds is not None else sp(params.seed)
        results = self.llm.generate([{"prompt_token_ids": list(c)} for c in contexts], sps, use_tqdm=False)
        out = []
        for r in results:
            o = r.outputs[0]
            lp = sum(next(iter(d.values())).logprob for d in (o.logprobs or []))
            finished = o.finish_reason == "stop"
            ids = list(o.token_ids)
            stop = ids[-1] if finished and ids else None
            if stop is not None and stop in self.stop_ids:
                ids = ids[:-1]
            out.append(Sample(ids, lp, finished, stop))
        return out

    def close(self) -> None:
        """Give the card back before scoring and training run in the same process.

        vLLM reserves most of the GPU memory for its KV-cache pool and keeps its engine process and
        distributed state alive after the LLM object is dropped; its own cleanup call frees them.
        """
        llm, self.llm = self.llm, None
        if llm is None:
            return
        shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm, shutdown
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:  # older vLLM: freeing the caching allocator is what is left to do
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            cleanup_dist_env_and_memory()


def resolve_backend(name: str) -> str:
    """`auto`: vLLM where it is installed and a CUDA GPU is present (the one-GPU recipe), else transformers."""
    if name != "auto":
        return name
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "transformers"


def make_backend(name: str, model_cfg: ModelConfig, batch_size: int, model=None, tokenizer=None,
                 prefix_cache: bool = True) -> Backend:
    name = resolve_backend(name)
    if name == "transformers":
        if model is None:
            model, tokenizer = load_model(model_cfg.model, model_cfg.dtype, model_cfg.device, attn=model_cfg.attn_implementation)
        return TransformersBackend(model, tokenizer, batch_size, prefix_cache=prefix_cache)
    if name == "vllm":
        tok = tokenizer or load_tokenizer(model_cfg.model)
        return VLLMBackend(resolve_model_path(model_cfg.model), tok, dtype=model_cfg.dtype)
    raise DlmaError(f"unknown backend {name!r}; available: transformers, vllm")


def _side_logprobs(backend, contexts, samples, texts, jobs, K: int, renderers, preset_of) -> tuple[list[float], list[float]]:
    """lp(o | p+) and lp(o | p-) of every sample (jobs: K positive then K negative per pair).

    R of a pair is the chosen sample's log-ratio lp(o|p+) - lp(o|p-) minus the rejected one's, so
    the best pair of the K x K is the positive sample with the highest ratio against the negative
    one with the lowest. Computed by the shared `score_trees`, the same numbers `dlma score`
    gives, which is why scoring can reuse them instead of computing the picked pair's four terms again.
    """
    trees, resp = [], []
    for k0 in range(0, len(jobs), 2 * K):
        renderer = renderers[preset_of[jobs[k0][0].id]]
        ids = [renderer.response_ids(t, truncated=not s.finished) for s, t in zip(samples[k0:k0 + 2 * K], texts[k0:k0 + 2 * K])]
        ids = [x or [renderer.eos_id] for x in ids]  # an empty answer still needs one scored token
        trees += [(contexts[k0], ids), (contexts[k0 + K], ids)]
        resp.append(len(ids))
    res = score_trees(backend.model, trees, pad_id=backend.tok.pad_token_id, batch_size=max(1, backend.batch_size // 4))
    lp_pos: list[float] = []
    lp_neg: list[float] = []
    for n in range(len(resp)):
        lp_pos += [res[2 * n][i][0] for i in range(resp[n])]
        lp_neg += [res[2 * n + 1][i][0] for i in range(resp[n])]
    return lp_pos, lp_neg


def generate_pairs(
    model_cfg: ModelConfig,
    cfg: GenerateConfig,
    out: str,
    *,
    backend: Backend | None = None,
    sampling: SamplingConfig | None = None,
    tokenizer=None,
    progress: bool = True,
    where: Where | None = None,
) -> dict:
    """Write one pair a line to `out`, resuming after the ids already there. Returns a summary.
    `sampling`: temperature, top_p, max_new_tokens and max_context of the responses (default: SamplingConfig()).

    A rerun resumes only what was made the same way from the same input: other settings, an
    edited preset file or prompts edited since are refused, never mixed into the file.
    `where`: the cfg.report_to trackers' run (default: beside `out`)."""
    sampling = sampling or SamplingConfig()
    sources = [x.strip() for x in cfg.prompts.split(",") if x.strip()]
    per_source = source_presets(sources, [x.strip() for x in cfg.preset.split(",") if x.strip()])
    presets = {name: load_preset(name) for name in per_source}
    stats = ReadStats()
    prompts: list[PromptRecord] = []
    preset_of: dict[str, str] = {}
    columns = column_map(cfg.columns)
    for source, preset in zip(sources, per_source):
        for p in read_prompts(source, cfg.limit, stats, columns):
            prompts.append(p)
            preset_of[p.id] = preset
    if not prompts:
        raise DlmaError(f"{cfg.prompts}: no usable prompts")
    check_not_input(out, [Path(f) for f in named_files(cfg.prompts)])
    preset_files = file_hashes(cfg.preset)  # a preset file edited since is another preset
    writer = JsonlWriter(out, settings={  # what shapes the records: another value must not append to this file
        "model": model_cfg.model, "dtype": model_cfg.dtype, "preset": cfg.preset, "num_pairs": cfg.num_pairs,
        "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": cfg.seed,
        "max_context": sampling.max_context, "backend": backend.name if backend is not None else resolve_backend(cfg.backend),
        "sampler": SAMPLER, **({"num_samples": cfg.num_samples} if cfg.num_samples > 1 else {}),
        **({"preset_files": preset_files} if preset_files else {})})
    owned = backend is None  # an engine made here is released here (vLLM holds the card otherwise)
    try:
        by_id = {p.id: p for p in prompts}
        check_same_inputs(writer, lambda rec: (rec.get("prompt_id"), [rec.get("prompt"), rec.get("label"), rec.get("preset")]),
                          lambda pid: [by_id[pid].prompt, by_id[pid].label, preset_of[pid]] if pid in by_id else None,
                          cfg.prompts)
        upgrade_before_append(writer)
        ids_for = lambda p: [p.id] if cfg.num_pairs == 1 else (f"{p.id}:{k}" for k in range(cfg.num_pairs))  # noqa: E731
        # pairs, not prompts, are the unit of work: a million pairs of one prompt are written as they come
        units = lambda: ((p, pid) for p in prompts for pid in ids_for(p))  # noqa: E731
        missing = sum(pid not in writer.done for _, pid in units())
        todo = {p.id for p, pid in units() if pid not in writer.done}
        summary = {"prompts": len(prompts), "empty_prompts_skipped": stats.empty, "already_done": len(prompts) - len(todo),
                   "pairs_written": 0, "contexts_truncated": 0, "empty_responses": 0, "new_tokens": 0, "output": str(out)}
        if not todo:
            return summary
        tracking = Tracking(cfg.report_to, where or Where.beside(out, "generate", file=True), "generate",
                            typed_settings(model=model_cfg, generate=cfg, sampling=sampling), model_cfg.device)
        if owned:
            backend = make_backend(cfg.backend, model_cfg, cfg.batch_size, prefix_cache=cfg.prefix_cache)
        summary.update(_sample_pairs(backend, cfg, sampling, model_cfg, tokenizer, presets, preset_of, writer,
                                     resume_chunks(units(), max(1, cfg.batch_size // 2) // cfg.num_samples,
                                                   lambda u: u[1] not in writer.done), missing, progress, tracking))
    finally:
        writer.close()
        if owned and backend is not None and hasattr(backend, "close"):
            backend.close()
    return summary


def _sample_pairs(backend: Backend, cfg: GenerateConfig, sampling: SamplingConfig, model_cfg: ModelConfig, tokenizer, presets: dict, preset_of: dict,
                  writer: JsonlWriter, chunks: Iterator[list[tuple[PromptRecord, str]]], missing: int, progress: bool,
                  tracking: Tracking) -> dict:
    """Sample, pick and write the pairs of `chunks` ((prompt, pair id) each); the summary's counts."""
    from tqdm.auto import tqdm

    from .models import load_tokenizer

    summary = {"pairs_written": 0, "empty_responses": 0, "new_tokens": 0}
    tok = tokenizer or getattr(backend, "tok", None) or load_tokenizer(model_cfg.model)
    renderers = {name: Renderer(tok, pr, max_context=context_room(sampling.max_context, sampling.max_new_tokens))
                 for name, pr in presets.items()}
    settings = {"model": model_cfg.model, "dtype": model_cfg.dtype, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_new_tokens": sampling.max_new_tokens, "max_context": sampling.max_context, "seed": cfg.seed, "backend": backend.name,
                **({"num_samples": cfg.num_samples} if cfg.num_samples > 1 else {})}
    if cfg.num_samples > 1 and getattr(backend, "model", None) is None:
        raise DlmaError(f"--num-samples {cfg.num_samples} picks pairs with the model's log-probs, which the "
                        f"{backend.name} backend does not expose; use the transformers backend")
    # a preset file named relative to here: its absolute path lets the pairs be scored from anywhere
    preset_file = {name: str(Path(name).resolve()) for name in presets if Path(name).suffix in (".yaml", ".yml")}
    stats0 = dict(getattr(backend, "stats", {}))
    bar = tqdm(total=missing, desc="generate", unit="pair", disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    try:
        K = cfg.num_samples
        for group in chunks:
            jobs: list[tuple[PromptRecord, str, str, int]] = [
                (p, pid, side, k) for p, pid in group for side in ("positive", "negative") for k in range(K)]
            contexts = [renderers[preset_of[p.id]].context_ids(p.prompt, side) for p, _, side, _ in jobs]
            params = SamplingParams(sampling.max_new_tokens, sampling.temperature, sampling.top_p, cfg.seed)
            # sample k > 0 of a side draws from a seed of its own; sample 0 is the one K = 1 draws
            samples = backend.sample(contexts, params, seeds=[row_seed(cfg.seed, pid, side, *([k] if k else []))
                                                              for _, pid, side, k in jobs])
            texts = [tok.decode(x.ids, skip_special_tokens=True) for x in samples]
            lps = _side_logprobs(backend, contexts, samples, texts, jobs, K, renderers, preset_of) if K > 1 else None
            ratios = [a - b for a, b in zip(*lps)] if lps else None
            for k0 in range(0, len(jobs), 2 * K):
                p, pid, _, _ = jobs[k0]
                if pid in writer.done:  # computed again only so that the rest shares an uninterrupted run's batch
                    continue
                renderer = renderers[preset_of[p.id]]
                rec = {"id": pid, "prompt_id": p.id, "prompt": p.prompt}
                if p.label is not None:
                    rec["label"] = p.label
                pick = {"chosen": 0, "rejected": 0}
                if ratios is not None:  # best of K x K: the pair with the largest R
                    pos, neg = ratios[k0:k0 + K], ratios[k0 + K:k0 + 2 * K]
                    pick = {"chosen": max(range(K), key=pos.__getitem__), "rejected": min(range(K), key=neg.__getitem__)}
                    # all 2K (K under p+, then K under p-) stay in the record for --loss listwise
                    rec["candidates"] = {"chosen_log_ratio": pos, "rejected_log_ratio": neg, "picked": pick,
                                         "lp_pos": lps[0][k0:k0 + 2 * K], "lp_neg": lps[1][k0:k0 + 2 * K],
                                         "texts": texts[k0:k0 + 2 * K],
                                         "truncated": [not x.finished for x in samples[k0:k0 + 2 * K]]}
                for key, at in (("chosen", k0 + pick["chosen"]), ("rejected", k0 + K + pick["rejected"])):
                    s, text = samples[at], texts[at]
                    rec[key] = text
                    rec[f"{key}_truncated"] = not s.finished
                    summary["empty_responses"] += int(not text.strip())
                    # The raw log-prob is reusable only if re-tokenizing the text gives back
                    # exactly the sampled ids (plus EOS): scoring tokenizes the text.
                    # A stop token other than the end of turn scoring appends (e.g. <eos> for
                    # <end_of_turn>) makes the raw log-prob another sequence's: not reused.
                    if renderer.response_ids(text, truncated=not s.finished) == (s.ids + ([s.stop_id] if s.finished else [])):
                        rec[f"gen_lp_{key}"] = s.logprob
                summary["new_tokens"] += sum(len(s.ids) + int(s.finished) for s in samples[k0:k0 + 2 * K])
                if "candidates" in rec or "gen_lp_chosen" in rec or "gen_lp_rejected" in rec:
                    rec["gen_lp_of"] = pair_digest(rec)  # what they were computed on: an edited pair recomputes them
                rec["preset"] = preset_of[p.id]
                if preset_of[p.id] in preset_file:
                    rec["preset_file"] = preset_file[preset_of[p.id]]
                rec["generation"] = settings
                writer.write(conversational(rec))
                summary["pairs_written"] += 1
                bar.update(1)
            elapsed = max(time.time() - t0, 1e-9)
            bar.set_postfix(pairs_per_s=f"{summary['pairs_written'] / elapsed:.2f}")
            tracking.log({"generate/pairs_per_s": summary["pairs_written"] / elapsed,
                          "generate/new_tokens_per_s": summary["new_tokens"] / elapsed}, step=summary["pairs_written"])
    finally:
        bar.close()
    summary["contexts_truncated"] = sum(r.truncated for r in renderers.values())
    for k in ("context_tokens", "prefilled_tokens"):  # how much of the contexts the shared prefixes saved
        if k in getattr(backend, "stats", {}):
            summary[k] = backend.stats[k] - stats0.get(k, 0)
    if "prefilled_tokens" in summary:  # every position prefilled or decoded; the output layer once per new token
        summary["model_flops"] = forward_flops(backend.model, summary["prefilled_tokens"] + summary["new_tokens"],
                                               summary["new_tokens"])
    summary["seconds"] = round(time.time() - t0, 2)
    with tracking:
        tracking.log({f"generate/{k}": v for k, v in summary.items()}, step=summary["pairs_written"])
    return summary
