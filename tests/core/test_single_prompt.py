"""A training set whose rows all share one prompt has no mismatched (prompt, completion) pair to estimate z0 from:
the trainer says so once and trains with z0 = 0 (TRL's `test_fully_truncated_completion_examples_dropped` leaves one
row), instead of pairing a row with itself as `trl.KTOTrainer` does."""

import copy
import logging
import math

import pytest
import torch
from conftest import collated_batch, cpu_args, sequence_logps
from datasets import Dataset
from test_loss import reference_kto

from trl_kto_ext import KTOExtTrainer


def _one_prompt(n=6):
    return Dataset.from_dict(
        {
            "prompt": ["1+2="] * n,
            "completion": [str(3 + i % 3) for i in range(n)],
            "label": [i % 3 == 0 for i in range(n)],
        }
    )


def test_trl_scenario_one_row_left_trains_with_z0_zero(small_model, tiny_tokenizer, tmp_path, caplog):
    dataset = Dataset.from_dict(
        {
            "prompt": ["Hi", "This is a very long prompt that fills up the whole max_length budget on its own"],
            "completion": [" there", " yes"],
            "label": [True, False],
        }
    )
    with caplog.at_level(logging.WARNING):
        trainer = KTOExtTrainer(
            model=small_model, args=cpu_args(tmp_path, max_length=6, max_steps=2), train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )  # fmt: skip
    assert len(trainer.train_dataset) == 1
    assert sum("Every training row has the same prompt" in r.getMessage() for r in caplog.records) == 1
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) and h["kl"] == 0.0 for h in logged)


def test_single_prompt_loss_is_the_formula_with_z0_zero(small_model, tiny_tokenizer, tmp_path):
    reference = copy.deepcopy(small_model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    trainer = KTOExtTrainer(
        model=copy.deepcopy(small_model), ref_model=reference, processing_class=tiny_tokenizer,
        args=cpu_args(tmp_path, beta=0.5), train_dataset=_one_prompt(),
    )  # fmt: skip
    batch = collated_batch(trainer, n_rows=6)
    assert "KL_input_ids" not in batch  # no KL rows are built
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    models64 = [copy.deepcopy(m).double() for m in (trainer.model, trainer.ref_model)]
    policy, ref = (sequence_logps(m, batch).tolist() for m in models64)
    labels = batch["label"].tolist()
    lam_d, lam_u = trainer.desirable_weight, trainer.undesirable_weight
    wanted, z0, _ = reference_kto(policy, ref, [], [], labels, 0.5, lam_d, lam_u)
    assert z0 == 0.0
    assert loss == pytest.approx(wanted, rel=1e-5)
    # With a z0 estimated from the same rows paired with themselves (TRL's fallback), the loss would differ.
    self_paired, z0_self, _ = reference_kto(policy, ref, policy, ref, labels, 0.5, lam_d, lam_u)
    assert z0_self > 0.01 and abs(self_paired - wanted) > 1e-4
