"""DLMA's loss inside TRL: `DLMATrainer` and `DLMAConfig` are TRL's own DPOTrainer and DPOConfig
with the DPO logit shifted by w * clamp(R), R read from each pair's `self_reward` column.

    TRL's sigmoid loss   -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)])
    DLMA's               -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r) - w * clamp(R, lo, hi)])

Adding the shift to the chosen side's reference log-prob turns the first into the second exactly,
so the trainer hands TRL's loss a shifted reference and everything else stays TRL's: tokenization
of the conversational pair file `dlma score` writes (no conversion code), the reference model or
precomputed reference log-probs, PEFT, accelerate, logging. TRL's `rewards/*` metrics are those
of the shifted logit; `dlma/shift` logs the mean shift, so rewards/margins + beta * dlma/shift is
the plain DPO margin.

    from datasets import load_dataset
    from dlma.integrations.trl import DLMAConfig, DLMATrainer

    pairs = load_dataset("json", data_files="scored.jsonl", split="train")
    DLMATrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", args=DLMAConfig(output_dir="out"),
                train_dataset=pairs).train()

Written against the TRL of dlma's `[trl]` extra (it overrides DPOTrainer._compute_loss and the
columns the trainer keeps); `pip install 'dlma[trl]'`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DlmaError
from ..losses import reward_shift

try:
    from trl import DPOConfig, DPOTrainer
except ImportError:  # pragma: no cover - depends on the environment
    raise DlmaError("dlma.integrations.trl needs TRL: pip install 'dlma[trl]'") from None


@dataclass
class DLMAConfig(DPOConfig):
    """DPOConfig plus DLMA's shift. Only TRL's plain sigmoid loss is shifted, so the options that
    change that loss (another loss_type, f-divergence, LD-DPO, WPO weighting, label smoothing) are refused."""

    margin_weight: float = field(default=0.2, metadata={"help": "DLMA: weight w of the self-reward shift (0 = DPO)"})
    margin_clip: list[float] = field(default_factory=lambda: [-40.0, 40.0],
                                     metadata={"help": "DLMA: clamp range [lo, hi] of the self-reward R"})
    reward_column: str = field(default="self_reward", metadata={"help": "DLMA: the dataset column holding R"})

    def __post_init__(self) -> None:
        super().__post_init__()
        other = {"loss_type": (self.loss_type, ["sigmoid"]), "f_divergence_type": (self.f_divergence_type, "reverse_kl"),
                 "ld_alpha": (self.ld_alpha, None), "use_weighting": (self.use_weighting, False),
                 "label_smoothing": (self.label_smoothing, 0.0)}
        for name, (value, plain) in other.items():
            if value != plain:
                raise DlmaError(f"DLMAConfig shifts TRL's plain sigmoid loss; {name}={value!r} changes that loss "
                                f"(leave it at {plain!r}, or use DPOTrainer)")
        if len(self.margin_clip) != 2 or self.margin_clip[0] > self.margin_clip[1]:
            raise DlmaError(f"DLMAConfig.margin_clip must be [lo, hi] with lo <= hi, got {self.margin_clip}")


class _WithReward:
    """TRL's preference collator, plus each pair's R as a float tensor under the reward column."""

    def __init__(self, inner: Any, column: str):
        self.inner, self.column = inner, column

    def __call__(self, examples: list[dict]) -> dict:
        out = self.inner(examples)
        missing = [i for i, e in enumerate(examples) if not isinstance(e.get(self.column), (int, float))]
        if missing:
            raise DlmaError(f"a pair in this batch has no numeric `{self.column}`; train on a file `dlma score` wrote "
                            "(or set DLMAConfig.reward_column)")
        out[self.column] = torch.tensor([float(e[self.column]) for e in examples], dtype=torch.float32)
        return out


class DLMATrainer(DPOTrainer):
    """TRL's DPOTrainer with DLMA's loss (see the module's docstring); takes a DLMAConfig."""

    def __init__(self, model: Any, ref_model: Any = None, args: DLMAConfig | None = None, **kwargs: Any):
        if not isinstance(args, DLMAConfig):
            raise DlmaError("DLMATrainer needs args=DLMAConfig(...) (a DPOConfig with margin_weight and margin_clip)")
        data = kwargs.get("train_dataset")
        if data is not None and args.reward_column not in (getattr(data, "column_names", None) or []):
            raise DlmaError(f"the training dataset has no `{args.reward_column}` column; train on a file `dlma score` "
                            "wrote, or use DPOTrainer for plain DPO")
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self.data_collator = _WithReward(self.data_collator, args.reward_column)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.args.reward_column not in self._signature_columns:  # keep R through remove_unused_columns
            self._signature_columns = [*self._signature_columns, self.args.reward_column]

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        reward = inputs.pop(self.args.reward_column)
        precomputed = self.precompute_ref_logps
        if not precomputed:  # the reference of this batch, as TRL computes it, so that it can be shifted
            with torch.no_grad():
                ref_c, ref_r = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else model, inputs)
            inputs.update(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
        shift = reward_shift(reward, self.args.margin_weight, tuple(self.args.margin_clip), like=inputs["ref_chosen_logps"])
        inputs["ref_chosen_logps"] = inputs["ref_chosen_logps"] + shift
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["dlma/shift"].append(self.accelerator.gather_for_metrics(shift).mean().item())
        self.precompute_ref_logps = True  # TRL's loss reads the (shifted) reference from the batch
        try:
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self.precompute_ref_logps = precomputed
