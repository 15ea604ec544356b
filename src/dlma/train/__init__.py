"""Training: scored pairs -> an aligned Hugging Face model directory.

One loop for every objective in `dlma.objectives` and every scale: a single CPU, one GPU, or
many processes under `accelerate launch` (DDP, FSDP, DeepSpeed ZeRO). The modules read in the
order training happens (`loop.py` tells it): examples, reference, order, objective and step,
runtime, checkpoints and save. `train_model` is the entry point; `train_step` is the one
optimizer step the loop and the benchmarks share.
"""

from .checkpoints import METRICS, SUMMARY
from .examples import Example, build_examples, select_pairs, set_reference
from .loop import train_model
from .objective import micro_batch_losses
from .order import epoch_plan, lr_at, token_chunks
from .reference import KL_REFERENCE, attach_kl_answers, reference_logprobs, stale_reference, untouched_answers
from .runtime import BackwardStepper, compile_layers, deepspeed_follows, lazy_ranks, mixed_precision, weights_dtype
from .save import interpolated
from .step import StepResult, StepStats, train_step

__all__ = [
    "KL_REFERENCE", "METRICS", "SUMMARY", "BackwardStepper", "Example", "StepResult", "StepStats", "attach_kl_answers",
    "build_examples", "compile_layers", "deepspeed_follows", "epoch_plan", "interpolated", "lazy_ranks", "lr_at",
    "micro_batch_losses", "mixed_precision", "reference_logprobs", "select_pairs", "set_reference", "stale_reference",
    "token_chunks", "train_model", "train_step", "untouched_answers", "weights_dtype",
]
