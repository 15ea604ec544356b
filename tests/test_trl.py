"""A TRL user trains on dlma's scored file as it is; DLMA's loss through TRL equals dlma's own."""

from __future__ import annotations

import pytest
import torch

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from dlma.config import ModelConfig, ScoreConfig, TrainConfig  # noqa: E402
from dlma.models import embedded_model_dir, load_weights  # noqa: E402

BATCH = 4


@pytest.fixture(scope="module")
def scored(tiny_pairs, embedded, tmp_path_factory):
    """The six tiny pairs scored by `dlma score` (R and reference log-probs), as written on disk."""
    from dlma.reward import score_file

    model, tok = embedded
    out = tmp_path_factory.mktemp("scored") / "scored.jsonl"
    score_file(ModelConfig(dtype="float32"), ScoreConfig(batch_size=4), str(tiny_pairs), str(out), model=model,
               tokenizer=tok, progress=False)
    return out


def _args(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, max_steps=2, learning_rate=1e-4,
                use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", logging_steps=1,
                save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return cls(**{**base, **kw})


def _weights_moved(before: torch.Tensor, model) -> bool:
    return not torch.equal(before, model.get_input_embeddings().weight.detach())


def test_trl_dpo_trainer_trains_on_the_scored_file_as_it_is(scored, tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    pairs = datasets.load_dataset("json", data_files=str(scored), split="train")
    trainer = DPOTrainer(model=str(embedded_model_dir()), args=_args(DPOConfig, tmp_path), train_dataset=pairs,
                         processing_class=tokenizer)
    before = trainer.model.get_input_embeddings().weight.detach().clone()
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert _weights_moved(before, trainer.model)


def test_dlma_loss_through_trl_equals_dlmas_own(scored, tokenizer, tmp_path):
    """After a training step (so the policy is not the reference), one batch's loss through TRL's
    DPOTrainer with DLMATrainer's shift, and through dlma's own objective on the same token ids with
    dlma's own reference log-probs, agree to 1e-5; plain DPO on the batch differs (R matters)."""
    from dlma.integrations.trl import DLMAConfig, DLMATrainer
    from dlma.train import Example, micro_batch_losses, reference_logprobs

    pairs = datasets.load_dataset("json", data_files=str(scored), split="train")
    cfg = TrainConfig(loss="dlma", beta=0.1, margin_weight=0.5, margin_clip=(-5.0, 5.0))
    trainer = DLMATrainer(model=str(embedded_model_dir()), train_dataset=pairs, processing_class=tokenizer,
                          args=_args(DLMAConfig, tmp_path, max_steps=1, beta=cfg.beta, margin_weight=cfg.margin_weight,
                                     margin_clip=list(cfg.margin_clip), precompute_ref_log_probs=True))
    before = trainer.model.get_input_embeddings().weight.detach().clone()
    trainer.train()
    assert _weights_moved(before, trainer.model)

    rows = [trainer.train_dataset[i] for i in range(BATCH)]
    assert len({round(r["self_reward"], 3) for r in rows}) > 1
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    policy = trainer.model
    policy.eval()
    with torch.no_grad():
        through_trl = float(trainer.compute_loss(policy, inputs))
        examples = [Example(id=r["id"], context=r["prompt_ids"], chosen=r["chosen_ids"], rejected=r["rejected_ids"],
                            self_reward=r["self_reward"]) for r in rows]
        reference = load_weights("embedded", torch.float32)  # the starting weights, loaded by dlma
        reference_logprobs(reference, examples, tokenizer.pad_token_id, trainer.accelerator, batch_size=BATCH)
        own = micro_batch_losses(policy, examples, cfg, tokenizer.pad_token_id, torch.device("cpu"))[0].losses
        dpo = micro_batch_losses(policy, examples, TrainConfig(loss="dpo", beta=cfg.beta), tokenizer.pad_token_id,
                                 torch.device("cpu"))[0].losses
    # dlma's reference agrees with the one TRL precomputed into the dataset
    assert max(abs(e.ref_chosen - r["ref_chosen_logps"]) for e, r in zip(examples, rows)) < 1e-3
    print(f"DLMA loss through TRL {through_trl:.8f}, dlma's own {float(own.mean()):.8f}, "
          f"difference {abs(through_trl - float(own.mean())):.2e}")
    assert abs(through_trl - float(own.mean())) < 1e-5
    assert abs(float(dpo.mean()) - float(own.mean())) > 1e-3


def test_dlma_config_refuses_what_it_does_not_shift(tmp_path):
    from dlma.errors import DlmaError
    from dlma.integrations.trl import DLMAConfig, DLMATrainer

    with pytest.raises(DlmaError, match="loss_type=\\['ipo'\\] changes that loss"):
        _args(DLMAConfig, tmp_path, loss_type="ipo")
    with pytest.raises(DlmaError, match="no `self_reward` column"):
        DLMATrainer(model="unused", args=_args(DLMAConfig, tmp_path),
                    train_dataset=datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}))
