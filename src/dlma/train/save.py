"""The trained model as a directory AutoModelForCausalLM / AutoTokenizer load.

Full or merged weights, or a LoRA adapter, saved `--interpolate` of the way from the starting
weights (1: as trained; below 1: weight-space interpolation towards the start, as WiSE-FT).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig
from ..errors import DlmaError
from ..models import load_weights
from .runtime import weights_dtype


def interpolated(state: dict, start: dict, ratio: float) -> dict:
    """start + ratio * (state - start) per tensor, computed in float32 and stored in each
    tensor's own dtype (ratio 0 gives `start` exactly, 1 gives `state`). Tensors that share
    storage in `state` (tied embeddings) share their result, so saving still writes them once."""
    if set(state) - set(start):
        raise DlmaError(f"--interpolate: the starting model has no weights {sorted(set(state) - set(start))[:3]}")
    out, done = {}, {}
    for name, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in done:
            s0 = start[name].to(device=v.device, dtype=torch.float32)
            done[key] = (s0 + ratio * (v.float() - s0)).to(v.dtype)
        out[name] = done[key]
    return out


def refuse_nonfinite(state: dict) -> None:
    """A model holding NaN or inf is never saved as if it were trained: say which tensors, and stop."""
    bad = [name for name, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DlmaError(f"the trained weights hold NaN or inf in {len(bad)} of {len(state)} tensors (e.g. {bad[0]}); "
                        "nothing was saved. Lower --lr, try --max-grad-norm 1, or check the pair file")


def save_final(accelerator, model, tok, out: Path, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Save the model and tokenizer to `out`, moved `cfg.interpolate` of the way from the starting weights."""
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every process calls it
    if accelerator.is_main_process:
        if cfg.interpolate != 1 and cfg.lora_r > 0:
            # the update is B @ A * scale: scaling B scales it exactly, merged or not
            with torch.no_grad():
                for name, p in unwrapped.named_parameters():
                    if "lora_B" in name:
                        p.mul_(cfg.interpolate)
        elif cfg.interpolate != 1:

            start = load_weights(model_cfg.model, weights_dtype(model_cfg)).state_dict()
            state = interpolated(state, start, cfg.interpolate)
            del start
        if cfg.lora_r > 0 and cfg.save_merged:
            unwrapped = unwrapped.merge_and_unload()
            state = None
        refuse_nonfinite(state if state is not None else unwrapped.state_dict())
        if cfg.lora_r > 0 and not cfg.save_merged:
            unwrapped.save_pretrained(out)
        else:
            unwrapped.config.use_cache = True
            unwrapped.save_pretrained(out, state_dict=state)
        tok.save_pretrained(out)
    accelerator.wait_for_everyone()
