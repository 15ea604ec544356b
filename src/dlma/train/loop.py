"""`train_model`: scored pairs -> an aligned model directory, through the story of this package.

    examples   pairs -> token ids, filtered and flipped by R          (examples.py)
    reference  reference log-probs and the KL term's held answers     (reference.py)
    order      a deterministic plan of optimizer steps and the lr     (order.py)
    step       forward, backward and update of one global batch       (step.py, objective.py)
    runtime    accelerate, precision, LoRA, the optimizer             (runtime.py)
    checkpoints / save   resume after a kill; the final model         (checkpoints.py, save.py)

Rerunning with the same output directory resumes from its last checkpoint; a finished run
returns its summary without training again.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..card import command_line, write_card
from ..config import ModelConfig, SamplingConfig, TrainConfig
from ..data import read_pairs
from ..errors import DlmaError
from ..machine import forward_flops
from ..models import load_tokenizer, load_weights
from ..objectives import objective
from ..prompts import Renderer, load_preset
from ..tracking import Where, typed_settings
from . import checkpoints as ck
from ..terms import check_presets_named, kl_on, nll_on, preset_roles, role_terms
from .examples import Example, build_examples, select_pairs, whole_chosen_kept
from .order import epoch_plan, lr_at
from .reference import fill_reference, hold_answers
from .runtime import (BackwardStepper, adamw, deepspeed_follows, lazy_ranks, make_accelerator, steps_in_backward,
                      trainable, weights_dtype)
from .save import save_final
from .selection import Selector
from .step import StepResult, train_step

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

# Steps whose loss or gradient is NaN/inf are skipped (the weights never see them); this many
# in a row stop training with an error.
MAX_NONFINITE_STEPS = 3


def train_model(model_cfg: ModelConfig, cfg: TrainConfig, data: str, out_dir: str, *, sampling: SamplingConfig | None = None,
                progress: bool = True, where: Where | None = None) -> dict:
    """Train on a (scored) pair file and save the model to out_dir; returns the run summary.
    `sampling` (default SamplingConfig()): the context cut, the response openings trained on, and the
    lengths of the KL term's answers and of the selection probes.
    `where`: the --report-to trackers' run (default: out_dir/tensorboard/train-NAME)."""
    sampling = sampling or SamplingConfig()
    out = Path(out_dir)
    where = where or Where.beside(out, "train", file=False)
    accelerator = make_accelerator(model_cfg, cfg, out, where)
    key = ck.resume_key(cfg, model_cfg, data, accelerator.num_processes, sampling)
    finished = ck.finished_summary(out, key)
    if finished is not None:
        return finished
    run = setup(accelerator, model_cfg, cfg, sampling, data, out, key)
    cfg = run.cfg  # the terms attached by role now name their presets
    log = Log(run, progress, where)
    while run.step < run.total:
        epoch, micros = run.micro_batches()
        result = train_step(run.model, run.optimizer, micros, cfg, run.pad_id, accelerator,
                            lr=lr_at(run.step, run.total, cfg), stepper=run.stepper, params=run.params if cfg.lora_r else None)
        run.step += 1
        log.step(account(run, epoch, result), result.loss)  # account raises after MAX_NONFINITE_STEPS bad steps in a row
        if run.selector is not None and run.selector.due(run.step):
            probe(run, log)
        if cfg.save_steps and run.step % cfg.save_steps == 0 and run.step < run.total:
            ck.save_checkpoint(accelerator, out, run.step, key, cfg.save_total_limit,
                               run.selector.save_state if run.selector is not None else None)
    log.close()
    return finish(run, log)


@dataclass
class TrainRun:
    """One run's state: what `setup` builds, the step the loop is at, and this process's tallies."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    out: Path
    key: dict
    accelerator: Accelerator
    tok: PreTrainedTokenizerBase
    counts: dict  # pairs read, flipped, filtered, used
    examples: list[Example]
    strata: list[str] | None  # each pair's preset, where --balance-presets
    model: torch.nn.Module  # as prepared by accelerate (a DDP/FSDP/DeepSpeed wrapper where there is one)
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    stepper: BackwardStepper | None
    ref_path: str  # where the reference log-probs came from
    ref_seconds: float
    per_epoch: int = 0  # optimizer steps
    total: int = 0
    step: int = 0  # optimizer steps done, counting those before a resume
    selector: Selector | None = None
    # this process's loop only (a resumed run counts the steps it ran)
    first_loss: float | None = None
    last: dict | None = None  # the latest metrics line
    bad_in_a_row: int = 0
    tokens: int = 0
    positions: int = 0
    head_positions: int = 0  # of `positions`, those through the output layer
    seconds: float = 0.0
    plan_epoch: int = -1
    plan: list[list[list[int]]] = field(default_factory=list)

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def micro_per_step(self) -> int:
        return self.world * self.cfg.grad_accum

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world * self.cfg.grad_accum

    def epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        return epoch_plan([e.length for e in self.examples], self.global_batch, self.micro_per_step, epoch,
                          self.cfg.seed, self.strata)

    def micro_batches(self) -> tuple[int, list[list[Example]]]:
        """The current step's epoch and micro-batches; each epoch is planned once."""
        epoch, index = divmod(self.step, self.per_epoch)
        if epoch != self.plan_epoch:
            self.plan, self.plan_epoch = self.epoch_steps(epoch), epoch
        return epoch, [[self.examples[i] for i in micro] for micro in self.plan[index]]


def setup(accelerator: Accelerator, model_cfg: ModelConfig, cfg: TrainConfig, sampling: SamplingConfig, data: str,
          out: Path, key: dict) -> TrainRun:
    """Everything before the first step: examples, weights and their reference log-probs, the
    prepared model and optimizer, the plan's length, and the state of a checkpoint to resume."""
    from accelerate.utils import DistributedType, set_seed

    ckpt = ck.checkpoint_to_resume(out, key)
    set_seed(cfg.seed)
    tok = load_tokenizer(model_cfg.model)
    renderer = Renderer(tok, load_preset(cfg.preset) if cfg.preset else None, sampling.max_context)
    pairs, counts = select_pairs(read_pairs(data, cfg.limit), cfg)
    if not pairs:
        raise DlmaError(f"{data}: no pairs left to train on ({counts})")
    have = {rec.get("preset") for rec in pairs}
    if cfg.rpo_roles or cfg.kl_roles:
        cfg, notes = role_terms(cfg, preset_roles(have))
        for note in notes:
            print(f"dlma train: {note}", file=sys.stderr, flush=True)
    check_presets_named(have, f"the pairs in {data}", "--rpo-presets", cfg.rpo_presets if cfg.rpo_alpha else [], "NLL",
                        lambda preset: nll_on(cfg, preset))
    check_presets_named(have, f"the pairs in {data}", "--kl-presets", cfg.kl_presets if cfg.kl_alpha else [], "KL",
                        lambda preset: kl_on(cfg, preset))
    examples = build_examples(pairs, renderer, listwise=objective(cfg.loss).responses == "ranked",
                              response_tokens=sampling.response_tokens,
                              whole_chosen=(lambda rec: nll_on(cfg, rec.get("preset")))
                              if whole_chosen_kept(cfg, sampling.response_tokens) else None)

    model = load_weights(model_cfg.model, weights_dtype(model_cfg), model_cfg.attn_implementation)
    # FSDP's cpu_ram_efficient_loading leaves ranks > 0 on the meta device until prepare fills them
    if not lazy_ranks(accelerator):
        model.to(accelerator.device)
    model.config.use_cache = False
    ref_path, ref_seconds = fill_reference(accelerator, model, tok.pad_token_id, examples, pairs, model_cfg, cfg,
                                           data, out, resuming=ckpt is not None)
    ref_seconds += hold_answers(accelerator, model, tok, examples, model_cfg, cfg, sampling.kl_tokens, out)
    if cfg.torch_compile and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise DlmaError("--torch-compile compiles the layers before accelerate wraps them, which FSDP and DeepSpeed "
                        "shard afterwards; under those set accelerate's own dynamo options in the config file "
                        "(dynamo_config: dynamo_backend INDUCTOR, dynamo_use_regional_compilation true), which "
                        "compile after wrapping")
    model, params = trainable(model, cfg)
    optimizer = adamw(params, cfg)
    if cfg.micro_tokens and accelerator.state.deepspeed_plugin is not None:
        raise DlmaError("--micro-tokens splits a micro-batch into several backward passes, which DeepSpeed's engine "
                        "counts as accumulation steps of its own; use --batch-size and --grad-accum under DeepSpeed")
    deepspeed_follows(accelerator.state.deepspeed_plugin, cfg, accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    stepper = BackwardStepper(optimizer, params) if steps_in_backward(cfg, accelerator) else None

    run = TrainRun(cfg, model_cfg, out, key, accelerator, tok, counts, examples,
                   [str(rec.get("preset")) for rec in pairs] if cfg.balance_presets else None,
                   model, params, optimizer, stepper, ref_path, ref_seconds)
    run.per_epoch = len(run.epoch_steps(0))
    if run.per_epoch == 0:
        raise DlmaError(f"{len(examples)} pairs are fewer than the {run.micro_per_step} micro-batches of one step")
    run.total = cfg.max_steps if cfg.max_steps is not None else run.per_epoch * cfg.epochs
    run.step = ck.load_checkpoint(accelerator, out, ckpt)
    if cfg.select_prompts:
        if run.world > 1:
            raise DlmaError("--select-prompts probes the model with greedy answers on one process; run it without "
                            "accelerate launch, or drop --select-prompts and evaluate checkpoints afterwards")
        run.selector = Selector(cfg, tok, renderer, out, run.total, ckpt, probe_tokens=sampling.probe_tokens)
    return run


def account(run: TrainRun, epoch: int, result: StepResult) -> dict:
    """Count the step just done (run.step) into the run's tallies and return its metrics line;
    MAX_NONFINITE_STEPS skipped steps in a row stop the run."""
    stats, loss = result.stats, result.loss
    run.bad_in_a_row = run.bad_in_a_row + 1 if result.bad else 0
    if run.bad_in_a_row >= MAX_NONFINITE_STEPS:
        weights = ("none reached the weights" if all(bool(torch.isfinite(p).all()) for p in run.params)
                   else "but an earlier update already left NaN or inf in the weights")
        raise DlmaError(f"training stopped at step {run.step}: {run.bad_in_a_row} steps in a row had a NaN or infinite "
                        f"loss or gradient (skipped; {weights}). Lower --lr, try --mixed-precision no, "
                        "or check the pair file")
    run.first_loss = loss if run.first_loss is None and not result.bad else run.first_loss
    run.tokens += stats.tokens
    run.positions += stats.positions
    run.head_positions += stats.head_positions
    run.seconds += result.seconds
    row = {"step": run.step, "epoch": epoch, "loss": _finite(loss), "lr": result.lr, "pairs": stats.pairs,
           "tokens": stats.tokens, "tokens_per_s": stats.tokens / result.seconds}
    if objective(run.cfg.loss).reference:  # an implicit reward exists where there is a reference
        row.update(reward_margin=_finite(stats.margin_sum / stats.pairs), reward_accuracy=stats.correct / stats.pairs)
    if stats.kl_pairs > 0:  # mean per-token KL to the untouched model on its own answers (--kl-alpha)
        row["kl"] = _finite(stats.kl_sum / stats.kl_pairs)
    if result.grad_norm is not None:
        row["grad_norm"] = _finite(float(result.grad_norm))
    if result.bad:
        row["skipped"] = True  # NaN/inf loss or gradient: the weights were not updated
    run.last = row
    return row


def _finite(x: float) -> float | None:
    """A metric for the JSON logs: NaN/inf become null (JSON has no NaN)."""
    return x if math.isfinite(x) else None


class Log:
    """Where the steps are reported: metrics.jsonl (main process), --report-to trackers, the progress bar."""

    def __init__(self, run: TrainRun, progress: bool, where: Where):
        from tqdm.auto import tqdm

        self.accelerator, self.progress = run.accelerator, progress
        self.path, self.every, self.total = run.out / ck.METRICS, run.cfg.log_steps, run.total
        self.main = run.accelerator.is_main_process
        self.trackers = bool(run.accelerator.log_with) if hasattr(run.accelerator, "log_with") else False
        if self.trackers:
            run.accelerator.init_trackers(where.run, config=typed_settings(train=run.cfg, model=run.model_cfg))
        self.bar = tqdm(total=run.total, initial=run.step, desc=f"train {run.cfg.loss}", unit="step",
                        disable=not (progress and self.main), dynamic_ncols=True)

    def step(self, row: dict, loss: float) -> None:
        """Every --log-steps and the last step go to the file and trackers; `loss` as computed (NaN shows)."""
        step = row["step"]
        if self.main and (step % self.every == 0 or step == self.total):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.trackers:
                self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        self.bar.update(1)

    def note(self, text: str) -> None:
        if self.progress:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()

    def end(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


def probe(run: TrainRun, log: Log) -> None:
    """--select-prompts: probe this step's weights; the selector keeps the best step's on disk."""
    # a probe's few greedy answers run the layers eagerly: compiling their prefill and decode
    # graphs (--torch-compile) would cost more than the probe
    with torch.compiler.set_stance("force_eager") if run.cfg.torch_compile else contextlib.nullcontext():
        result = run.selector.probe(run.step, run.accelerator.unwrap_model(run.model))
    log.note(f"step {run.step}: {run.cfg.select_prompts} refused {result.refusal:.1%} of unsafe, "
             f"{result.over_refusal:.1%} of safe prompts; keeping step {run.selector.kept}")


def finish(run: TrainRun, log: Log) -> dict:
    """After the last step: the final model (the selected step's weights, where one was
    selected), train_summary.json and the model card; the checkpoints go, a finished run needs none."""
    accelerator = run.accelerator
    if run.stepper is not None:
        run.stepper.remove()
    accelerator.wait_for_everyone()
    if run.selector is not None:
        run.selector.restore(accelerator.unwrap_model(run.model), run.step)
    save_final(accelerator, run.model, run.tok, run.out, run.cfg, run.model_cfg)
    result = summary(run)
    if accelerator.is_main_process:
        ck.write_summary(run.out, result)
        write_card(run.out)
        if run.selector is not None:
            run.selector.cleanup()
        shutil.rmtree(run.out / "checkpoints", ignore_errors=True)
    log.end()
    accelerator.wait_for_everyone()
    return result


def summary(run: TrainRun) -> dict:
    """train_summary.json. The first loss and the skipped steps come from metrics.jsonl, which
    spans the runs before a resume; speed and FLOPs are this process's."""
    cfg, last = run.cfg, run.last
    history = ck.read_metrics(run.out) if run.accelerator.is_main_process else []
    out = {
        "out": str(run.out), "loss": cfg.loss, **run.counts,
        "reference": run.ref_path, "reference_seconds": round(run.ref_seconds, 3),
        "steps": run.step, "epochs": round(run.step / run.per_epoch, 3), "global_batch": run.global_batch,
        "processes": run.world, "mixed_precision": run.accelerator.mixed_precision,
        "step_in_backward": run.stepper is not None, "torch_compile": cfg.torch_compile, "share_context": cfg.share_context,
        "weights_dtype": str(weights_dtype(run.model_cfg)).replace("torch.", ""),
        "first_loss": next((r["loss"] for r in history if not r.get("skipped")), None) if history else run.first_loss,
        "final_loss": last["loss"] if last else None,
        "steps_skipped_nonfinite": sum(1 for r in history if r.get("skipped")),
        "reward_accuracy": last.get("reward_accuracy") if last else None,
        "reward_margin": last.get("reward_margin") if last else None,
        "train_seconds": round(run.seconds, 3),
        "tokens_per_s": round(run.tokens / run.seconds, 2) if run.seconds else None,
        # forward + backward of the policy, three forwards' worth (the reference is not counted)
        "model_flops": 3 * forward_flops(run.model, run.positions, run.head_positions),
        "interpolate": cfg.interpolate,
        "kl_pairs": sum(bool(e.kl_answer) for e in run.examples),
        # the presets the NLL and KL terms reached, once the roles that name them were resolved
        # ([]: the term is off; "all": on every pair)
        "terms": {"rpo_presets": (list(cfg.rpo_presets) or "all") if cfg.rpo_alpha else [],
                  "kl_presets": (list(cfg.kl_presets) or "all") if cfg.kl_alpha else []},
        "kl": last.get("kl") if last else None,
        "resume_key": run.key,
        "command": command_line(),
    }
    if run.selector is not None:
        out["selection"] = run.selector.summary()
    return out
