"""The bundled accelerate configs as `accelerate launch` reads them: FSDP wraps each model's own
decoder layers (its `_no_split_modules`, not a hard-coded Llama class), and DeepSpeed clips,
batches and accumulates by dlma's flags instead of the config's.

Runs accelerate's own launch plumbing (config file -> environment -> plugin) in this process:
no GPU, no process group and no deepspeed install needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dlma" / "configs" / "accelerate"


def _launch_env(name: str, monkeypatch) -> dict[str, str]:
    """The FSDP_/ACCELERATE_ variables `accelerate launch --config_file name` gives its processes, set here."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    env = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    monkeypatch.delenv("ACCELERATE_GRADIENT_CLIPPING", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _tiny_qwen2():
    """Not a Llama: the README's example model family, so a hard-coded LlamaDecoderLayer would fail."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    return AutoModelForCausalLM.from_config(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64))


@pytest.mark.parametrize("name", ["fsdp_8gpu.yaml", "multinode_fsdp_2x8gpu.yaml"])
@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_configs_wrap_the_models_own_decoder_layers(name, lora, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    env = _launch_env(name, monkeypatch)
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    model = _tiny_qwen2()
    if lora:  # dlma wraps the model in PEFT before prepare; the attribute is forwarded to the base model
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    plugin = FullyShardedDataParallelPlugin()  # reads the launch environment, as the Accelerator does
    plugin.set_auto_wrap_policy(model)  # what prepare does first
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(m).__name__ for _, m in model.named_modules() if policy(m)]
    assert plugin.transformer_cls_names_to_wrap == ["Qwen2DecoderLayer"]
    assert wrapped == ["Qwen2DecoderLayer", "Qwen2DecoderLayer"]
    # ranks > 0 load on meta: dlma must neither move the model nor compute the reference before prepare
    from types import SimpleNamespace

    from dlma.train import lazy_ranks

    assert plugin.cpu_ram_efficient_loading
    assert lazy_ranks(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    assert not lazy_ranks(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None)))


@pytest.mark.parametrize("name", ["deepspeed_zero2_8gpu.yaml", "deepspeed_zero3_8gpu.yaml"])
def test_deepspeed_configs_follow_dlma_flags(name, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    from dlma.config import TrainConfig
    from dlma.train import deepspeed_follows

    env = _launch_env(name, monkeypatch)
    assert "ACCELERATE_GRADIENT_CLIPPING" not in env

    def prepared(plugin, micro: int, total: int) -> dict:
        # what accelerate's DeepSpeed prepare fills into `auto` entries: the Accelerator's accumulation
        # (1 here), then a missing clipping becomes 1.0
        plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=1)
        plugin.deepspeed_config_process(must_match=False, gradient_clipping=1.0, train_micro_batch_size_per_gpu=micro,
                                        train_batch_size=total)
        return plugin.deepspeed_config

    assert prepared(DeepSpeedPlugin(), 4, 64)["gradient_clipping"] == 1.0  # what happens without dlma's settings
    for norm in (0.0, 0.5):
        plugin = DeepSpeedPlugin()
        deepspeed_follows(plugin, TrainConfig(max_grad_norm=norm, batch_size=4, grad_accum=2), world=8)
        # prepare without a dataloader (dlma passes none) raises on an `auto` micro-batch
        assert not plugin.is_auto("train_micro_batch_size_per_gpu")
        ds = prepared(plugin, 4, 64)
        assert ds["gradient_clipping"] == norm
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 64)
    deepspeed_follows(None, TrainConfig(), world=1)  # not DeepSpeed: nothing to do
