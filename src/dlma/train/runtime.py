"""Where training runs: accelerate (one CPU, one GPU, DDP, FSDP or DeepSpeed), precision, the
trainable parameters (full, LoRA, checkpointed, compiled) and the optimizer.

Memory: float32 master weights and AdamW moments are the fixed cost. On top of it, where exact
(one process, no accumulation, no clipping), each weight is updated inside the backward pass
and its gradient freed at once (`BackwardStepper`); autocast keeps no cache of low-precision
weight copies, so with --gradient-checkpointing only the layer being recomputed holds them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig, TrainConfig
from ..errors import DlmaError
from ..models import DTYPES, bf16_supported, resolve_device
from ..tracking import Where, make_trackers

if TYPE_CHECKING:
    from accelerate import Accelerator


def mixed_precision(cfg: TrainConfig, model_cfg: ModelConfig) -> str:
    """Autocast of --mixed-precision auto: bf16 on a GPU that runs it; CPUs train in float32
    for the reason resolve_dtype gives (the same numbers on every CPU)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision

    dev = resolve_device(model_cfg.device)
    return "bf16" if dev.type != "cpu" and bf16_supported(dev) else "no"


def weights_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """Float32 master weights unless a low-precision dtype was asked for explicitly."""
    if model_cfg.dtype == "auto":
        return torch.float32
    if model_cfg.dtype not in DTYPES:
        raise DlmaError(f"unknown dtype {model_cfg.dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[model_cfg.dtype]


def make_accelerator(model_cfg: ModelConfig, cfg: TrainConfig, out: Path, where: Where) -> Accelerator:
    """The run's Accelerator, reporting to cfg.report_to at `where`; an unknown or missing device is
    a clean error before any work."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    resolve_device(model_cfg.device)
    # accelerate sets up multi-process CPU runs (gloo) only when told cpu=True
    cpu = model_cfg.device == "cpu" or (model_cfg.device == "auto" and not torch.cuda.is_available())
    # No autocast weight cache: a cached low-precision copy of every weight would live through
    # the whole forward even where checkpointing recomputes the layer; recasting costs little.
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision(cfg, model_cfg),
                       gradient_accumulation_steps=cfg.grad_accum,
                       kwargs_handlers=[AutocastKwargs(cache_enabled=False)],
                       log_with=make_trackers(cfg.report_to, where, "train") or None,
                       project_dir=str(out))


def lazy_ranks(accelerator) -> bool:
    """True where FSDP loads weights on rank 0 only (cpu_ram_efficient_loading): the others hold meta tensors."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return bool(plugin is not None and getattr(plugin, "cpu_ram_efficient_loading", False))


def deepspeed_follows(plugin, cfg: TrainConfig, world: int) -> None:
    """Under DeepSpeed, make the engine clip, batch and accumulate as dlma's flags say (call before prepare).

    The engine clips by its own config, not by `accelerator.clip_grad_norm_`, and accelerate fills
    a missing or `auto` gradient_clipping with 1.0 at prepare, so --max-grad-norm (0 = off) was
    silently replaced. prepare also cannot size an `auto` micro-batch without a dataloader (dlma
    passes none), and takes the config's accumulation over the Accelerator's. No-op without DeepSpeed.
    """
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["gradient_clipping"] = float(cfg.max_grad_norm)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * world


def steps_in_backward(cfg: TrainConfig, accelerator) -> bool:
    """Whether each weight is updated inside backward: exact only when its gradient is final there."""
    from accelerate.utils import DistributedType

    why = []
    if accelerator.num_processes > 1 or accelerator.distributed_type != DistributedType.NO:
        why.append("more than one process (gradients are reduced after the backward)")
    if cfg.grad_accum > 1:
        why.append("--grad-accum > 1")
    if cfg.max_grad_norm > 0:
        why.append("--max-grad-norm > 0 (the global norm needs every gradient first)")
    if cfg.micro_tokens > 0:
        why.append("--micro-tokens (a micro-batch's gradients add up over its passes)")
    if cfg.step_in_backward == "on" and why:
        raise DlmaError(f"--step-in-backward on is not exact with {'; '.join(why)}")
    return cfg.step_in_backward == "on" or (cfg.step_in_backward == "auto" and not why)


class BackwardStepper:
    """AdamW applied per parameter from a post-accumulate-grad hook, the gradient freed right after.

    The update is the same fused AdamW as a whole-model step (per-parameter, there is no
    cross-parameter coupling without clipping); the moments live in `optimizer.state`, so
    checkpoints save and resume them unchanged. A gradient holding NaN/inf is not applied. With
    the fused kernel the check stays on the device: the kernel's own `found_inf` input (what
    GradScaler uses) skips the update, so backward never waits for the host; reading the flag
    once per step (`take_nonfinite`) is the only synchronisation. Without it (an optimizer built
    unfused) each hook asks the host.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
        self.optimizer = optimizer  # the (prepared) optimizer whose state and lr are used
        inner = getattr(optimizer, "optimizer", optimizer)
        self.inner = inner
        accepted = inspect.signature(type(inner).__init__).parameters
        defaults = {k: v for k, v in inner.defaults.items() if k in accepted and k != "params"}
        self.single = {p: type(inner)([p], **defaults) for p in params}
        self.on_device = bool(defaults.get("fused"))
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self.nonfinite: torch.Tensor | int = 0  # gradients dropped for NaN/inf since take_nonfinite

    def _hook(self, p: torch.nn.Parameter) -> None:
        opt = self.single[p]
        if self.on_device:
            found = (~torch.isfinite(p.grad).all()).float()  # 1: the fused kernel leaves p and its moments
            opt.found_inf = found
            self.nonfinite = self.nonfinite + found
        elif not bool(torch.isfinite(p.grad).all()):
            p.grad = None
            self.nonfinite += 1
            return
        opt.state = self.inner.state  # re-linked every time: load_state_dict replaces the dict
        opt.param_groups[0]["lr"] = self.inner.param_groups[0]["lr"]
        opt.step()
        p.grad = None

    def take_nonfinite(self) -> int:
        """How many gradients were dropped since the last call (one host read)."""
        n, self.nonfinite = int(self.nonfinite), 0
        return n

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def trainable(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The model in training mode, with checkpointing and LoRA where asked, and the parameters it trains."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise DlmaError("--lora-r needs peft: pip install 'dlma[lora]'") from None
        target = cfg.lora_target[0] if cfg.lora_target == ["all-linear"] else list(cfg.lora_target)
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=target, task_type="CAUSAL_LM"))
    model.train()
    if cfg.torch_compile:
        compile_layers(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def compile_layers(model: torch.nn.Module) -> int:
    """--torch-compile: compile each decoder layer in place (torch's regional compilation: the
    layers share one compiled graph, so compiling costs one layer's time, not the model's), with
    dynamic shapes because packed rows change length every batch. In place, the module tree,
    its state-dict keys and its hooks stay as they were: checkpoints load either way."""
    names = set(getattr(model, "_no_split_modules", None) or getattr(getattr(model, "base_model", None), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DlmaError(f"--torch-compile: {type(model).__name__} names no decoder layer class (_no_split_modules) to compile")
    if getattr(model, "is_gradient_checkpointing", False):
        # transformers' layers record outputs (for output_hidden_states, which training never
        # asks for) in a context variable; dynamo refuses that side effect under checkpointing
        # and would leave every layer uncompiled, unless told the recompute may skip it
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    try:  # the fused kernel updates in place: faster, and no second copy of the weights at step time
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
