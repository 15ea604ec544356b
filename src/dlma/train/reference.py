"""What training compares with, made once from the starting weights before the first step.

Reference log-probs come from the scored file where every pair carries them (and they were
made by this model in this precision), else they are computed here and cached in the output
directory, so no reference model is held while training and a resumed run reuses them. With
--kl-alpha, the untouched model's greedy answers to the --kl-presets prompts and its top-K
next-token log-probs along them (the target of the KL term) are made and cached the same way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..config import ModelConfig, TrainConfig
from ..data import replacing, write_json
from ..errors import DlmaError
from ..generate import SamplingParams, TransformersBackend
from ..logprobs import branch_logits, score_sequences
from ..objectives import objective
from ..detectors import for_preset
from ..prompts import load_preset
from ..terms import kl_on
from .examples import Example, set_reference
from .runtime import lazy_ranks, weights_dtype

if TYPE_CHECKING:
    from accelerate import Accelerator

REFERENCE = "reference_logprobs.json"
KL_REFERENCE = "kl_reference.pt"
KL_TOP_K = 20  # reference tokens kept per answer position; the rest are one bucket (losses.kl_to_reference)
KL_BATCH = 64  # answers decoded together when the untouched model's answers are made


def reference_logprobs(model, examples: list[Example], pad_id: int, accelerator, batch_size: int) -> None:
    """Fill the reference log-probs of every example's responses from the current (initial) weights, sharded over processes."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(examples), world))
    ranked = [examples[i].ranked for i in mine]
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        sums, _ = score_sequences(model, [examples[i].context for i, r in zip(mine, ranked) for _ in r],
                                  [x for r in ranked for x in r], pad_id=pad_id, batch_size=batch_size)
    model.train(was_training)
    local, at = [], 0
    for i, r in zip(mine, ranked):
        local.append((i, sums[at:at + len(r)]))
        at += len(r)
    for i, lps in (gather_object(local) if world > 1 else local):
        set_reference(examples[i], lps)


def stale_reference(pairs: list[dict], model_cfg: ModelConfig) -> str | None:
    """Why the scored file's reference log-probs don't fit this training, or None.

    A reference from another model or precision leaves the implicit reward off zero at step
    0, a bias the loss then trains on; such files are recomputed from the initial weights.
    Files without `ref_from` (older, or written by other tools) are trusted as before.
    """
    want = {"model": model_cfg.model, "dtype": str(weights_dtype(model_cfg)).replace("torch.", "")}
    for rec in pairs:
        made = rec.get("ref_from")
        if isinstance(made, dict) and "ref_lp_chosen" in rec:
            diff = [f"{k} {made.get(k)!r}" for k in want if made.get(k) != want[k]]
            if diff:
                return f"with {', '.join(diff)}, not {', '.join(f'{k} {want[k]!r}' for k in want)}"
    return None


def fill_reference(accelerator: Accelerator, model: torch.nn.Module, pad_id: int, examples: list[Example],
                   pairs: list[dict], model_cfg: ModelConfig, cfg: TrainConfig, data: str, out: Path,
                   resuming: bool) -> tuple[str, float]:
    """Fill in the reference log-probs: from the scored file, then a cache from an interrupted
    run, else computed now from the initial weights (and cached). Returns where they came
    from and the seconds spent computing them."""
    if not objective(cfg.loss).reference:
        return f"not needed ({cfg.loss})", 0.0
    computed = "computed once before the first step from the initial weights"
    ref_seconds = 0.0
    cache = out / REFERENCE
    stale = stale_reference(pairs, model_cfg)
    if stale:
        for e in examples:
            e.ref_chosen = e.ref_rejected = None
    if all(e.ref_chosen is not None and e.ref_rejected is not None for e in examples):
        ref_path = "from the scored file"
    elif cache.is_file():
        saved = json.loads(cache.read_text())
        for e in examples:
            set_reference(e, saved[e.id])
        ref_path = computed
    else:
        if resuming:
            raise DlmaError(f"{cache} is missing, so the reference of the checkpoint in {out} cannot be rebuilt; "
                            "choose another --out")
        if lazy_ranks(accelerator):
            raise DlmaError(f"{data}: the pairs carry no reference log-probs, and with FSDP's cpu_ram_efficient_loading "
                            "only rank 0 holds weights before training starts; run `dlma score` on them first (it "
                            "writes ref_lp_chosen/ref_lp_rejected), or set fsdp_cpu_ram_efficient_loading: false")
        t0 = time.perf_counter()
        reference_logprobs(model, examples, pad_id, accelerator, cfg.batch_size * 2)
        ref_seconds = time.perf_counter() - t0
        if accelerator.is_main_process:
            write_json(cache, {e.id: e.reference for e in examples})
        ref_path = computed
    if stale:
        ref_path += f" (the scored file's were made {stale})"
    return ref_path, ref_seconds


def hold_answers(accelerator: Accelerator, model: torch.nn.Module, tok, examples: list[Example],
                 model_cfg: ModelConfig, cfg: TrainConfig, kl_tokens: int, out: Path) -> float:
    """--kl-alpha: give every --kl-presets example the untouched model's greedy answer to its
    prompt and the reference's top-K next-token log-probs along it. Made once by the main process
    (the only one holding weights under FSDP's lazy loading) from the initial weights, cached in
    `out` for a resumed run; returns the seconds spent making them."""
    if not cfg.kl_alpha:
        return 0.0
    wanted = [e for e in examples if kl_on(cfg, e.preset)]
    key = {"model": model_cfg.model, "dtype": model_cfg.dtype, "kl_tokens": kl_tokens, "top_k": KL_TOP_K}
    cache = out / KL_REFERENCE
    t0 = time.perf_counter()

    def cached() -> dict | None:
        if not cache.is_file():
            return None
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        ok = saved.get("key") == key and all(str(tuple(e.context)) in saved["answers"] for e in wanted)
        return saved if ok else None

    saved = cached() if accelerator.is_main_process else None
    if accelerator.is_main_process and saved is None:
        out.mkdir(parents=True, exist_ok=True)
        print(f"dlma train: the untouched model answers the {len(wanted)} --kl-presets prompts (greedy, "
              f"{kl_tokens} tokens) for the KL term, once; cached in {cache}", file=sys.stderr, flush=True)
        saved = untouched_answers(model, tok, [e.context for e in wanted], kl_tokens, key)
        with replacing(cache) as tmp:
            torch.save(saved, tmp)
    accelerator.wait_for_everyone()
    saved = saved or cached()
    if saved is None:
        raise DlmaError(f"{cache}: the untouched model's answers for --kl-alpha could not be read back")
    if cfg.kl_keep == "attribute":
        detectors = {name: for_preset(load_preset(name)) for name in {e.preset for e in wanted if e.preset}}
        wanted = [e for e in wanted
                  if shows_attribute(detectors.get(e.preset), saved["answers"][str(tuple(e.context))], tok, kl_tokens)]
    attach_kl_answers(wanted, saved)
    return time.perf_counter() - t0


def shows_attribute(detector, answer: list[int], tok, limit: int) -> bool:
    """Whether an untouched answer shows the attribute by the preset's `detector` (True where there
    is none); an answer as long as the token limit counts as cut there."""
    return detector is None or detector(tok.decode(answer, skip_special_tokens=True), len(answer) >= limit)


def attach_kl_answers(examples: Sequence[Example], saved: dict) -> None:
    """Give each example its prompt's untouched answer and reference log-probs from `saved`
    (`untouched_answers`' output); an empty answer leaves the example without the KL branch."""
    for e in examples:
        c = str(tuple(e.context))
        if saved["answers"][c]:
            e.kl_answer, e.kl_ref_ids, e.kl_ref_lp = saved["answers"][c], saved["ids"][c], saved["lp"][c]


@torch.inference_mode()
def untouched_answers(model: torch.nn.Module, tok, contexts: list[list[int]], max_new_tokens: int, key: dict) -> dict:
    """Greedy answers of `model` (the starting weights) to the distinct contexts, their stop token
    kept where they finished, and the top-K log-probs of the next token at each answer position,
    both through the same routines generation and training use."""
    distinct = list(dict.fromkeys(tuple(c) for c in contexts))
    was_training = model.training
    model.eval()
    try:
        samples = TransformersBackend(model, tok, KL_BATCH).sample([list(c) for c in distinct],
                                                                    SamplingParams(max_new_tokens, 0.0, 1.0, 0))
        answers = [(s.ids + ([s.stop_id] if s.finished and s.stop_id is not None else []))[:max_new_tokens]
                   for s in samples]
        saved: dict = {"key": key, "answers": {}, "ids": {}, "lp": {}}
        device = next(model.parameters()).device
        for start in range(0, len(distinct), KL_BATCH // 4):
            part = [i for i in range(start, min(start + KL_BATCH // 4, len(distinct))) if answers[i]]
            if not part:
                continue
            res = branch_logits(model, [list(distinct[i]) for i in part], [[answers[i]] for i in part],
                                tok.pad_token_id, device)
            for j, i in enumerate(part):
                top = res.distributions(j, 0).topk(KL_TOP_K, dim=-1)
                c = str(distinct[i])
                saved["ids"][c], saved["lp"][c] = top.indices.to("cpu", torch.int32), top.values.float().cpu()
        for c, a in zip(distinct, answers):
            saved["answers"][str(c)] = a if str(c) in saved["ids"] else []
    finally:
        model.train(was_training)
    return saved
