"""Reproducibility: a resumed run logs what an uninterrupted one does (KL pairing, lambda, losses and metrics), the
same seed gives the same metrics, and another pairing seed another KL pairing."""

import copy
import json
import os

import pytest
from conftest import cpu_args
from transformers import TrainerCallback

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset

# Logged values that depend on the wall clock, not on the training.
_TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


class StopAfterSave(TrainerCallback):
    """Ends training right after the checkpoint of `step` is written, as an interruption would."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def record_batches(trainer):
    """Records (input_ids, KL_input_ids) of every batch the trainer's collator builds."""
    collator, seen = trainer.data_collator, []
    build = collator.torch_call

    def torch_call(examples):
        batch = build(examples)
        seen.append((batch["input_ids"].tolist(), batch["KL_input_ids"].tolist()))
        return batch

    collator.torch_call = torch_call
    return seen


def step_logs(trainer):
    return {
        h["step"]: {k: v for k, v in h.items() if k not in _TIMING} for h in trainer.state.log_history if "loss" in h
    }


@pytest.mark.parametrize("gradient_accumulation_steps", [1, 2])
def test_resume_gives_the_same_steps_as_an_uninterrupted_run(
    small_model, tiny_tokenizer, tmp_path, gradient_accumulation_steps
):
    # 40 rows in batches of 4: the checkpoint of step 3 falls inside an epoch, where the dataloader has already
    # collated (and paired) batches that were not trained on. An eval at each save must not disturb the pairing.
    train = make_kto_dataset(40, seed=3, desirable_ratio=0.25)  # lambda_D = 3
    evaluation = make_kto_dataset(8, seed=4, split="heldout")

    def run(output_dir, resume=None, stop_at=None):
        args = cpu_args(
            output_dir,
            max_steps=6,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=gradient_accumulation_steps,
            save_strategy="steps",
            save_steps=3,
            eval_strategy="steps",
            eval_steps=3,
        )
        trainer = KTOExtTrainer(
            model=copy.deepcopy(small_model),
            args=args,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tiny_tokenizer,
            callbacks=[StopAfterSave(stop_at)] if stop_at else None,
        )
        batches = record_batches(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return step_logs(trainer), batches

    full, full_batches = run(tmp_path / "full")
    partial, _ = run(tmp_path / "interrupted", stop_at=3)
    assert sorted(partial) == [1, 2, 3]
    checkpoint = tmp_path / "interrupted" / "checkpoint-3"
    assert os.path.isfile(checkpoint / "kl_pairing_state.json")
    resumed, resumed_batches = run(tmp_path / "interrupted", resume=str(checkpoint))

    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's log history
    # The same rows, paired with the same KL completions, as the uninterrupted run's last steps.
    per_step = gradient_accumulation_steps
    assert resumed_batches[: 3 * per_step] == full_batches[3 * per_step : 6 * per_step]
    for step in (4, 5, 6):
        assert set(resumed[step]) == set(full[step])
        for key, value in full[step].items():
            assert resumed[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)
    assert resumed[6]["lambda_D"] == pytest.approx(3.0) and resumed[6]["lambda_U"] == 1.0
    assert any(resumed[step]["kl"] > 0 for step in (4, 5, 6))  # the pairing matters for these values


def test_pairing_state_file_holds_the_state_before_untrained_batches(small_model, tiny_tokenizer, tmp_path):
    args = cpu_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
    trainer = KTOExtTrainer(
        model=small_model, args=args, train_dataset=make_kto_dataset(40, seed=5), processing_class=tiny_tokenizer
    )
    trainer.train()
    state = json.loads((tmp_path / "checkpoint-2" / "kl_pairing_state.json").read_text())
    # Two batches trained on: the history holds their 8 rows only, not the rows of the batch collated ahead.
    assert len(state["history"]) == 8
    assert state["num_tokens"] == trainer._total_train_tokens


# ------------------------------------------------------------------------------------------------ determinism
def train_steps(model, tokenizer, output_dir, max_steps=20, **overrides):
    args = cpu_args(output_dir, max_steps=max_steps, per_device_train_batch_size=4, **overrides)
    trainer = KTOExtTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=make_kto_dataset(40, seed=6, desirable_ratio=0.4),
        processing_class=tokenizer,
    )
    batches = record_batches(trainer)
    trainer.train()
    return step_logs(trainer), batches


def test_same_seed_same_metrics_and_other_pairing_seed_other_pairing(small_model, tiny_tokenizer, tmp_path):
    first, first_batches = train_steps(small_model, tiny_tokenizer, tmp_path / "a")
    again, again_batches = train_steps(small_model, tiny_tokenizer, tmp_path / "b")
    assert sorted(first) == list(range(1, 21))
    assert first == again  # every logged value of the 20 steps, exactly
    assert first_batches == again_batches

    other, other_batches = train_steps(small_model, tiny_tokenizer, tmp_path / "c", max_steps=3, kl_pairing_seed=1)
    # Same rows in the same order (the data order follows `seed`), other KL completions, other z0.
    assert [rows for rows, _ in other_batches[:3]] == [rows for rows, _ in first_batches[:3]]
    assert [kl for _, kl in other_batches[:3]] != [kl for _, kl in first_batches[:3]]
    assert [other[s]["kl_raw"] for s in (2, 3)] != [first[s]["kl_raw"] for s in (2, 3)]

    reseeded, reseeded_batches = train_steps(small_model, tiny_tokenizer, tmp_path / "d", max_steps=2, seed=1)
    assert [kl for _, kl in reseeded_batches[:2]] != [kl for _, kl in first_batches[:2]]


def test_evaluation_pairing_is_the_same_at_every_evaluation(small_model, tiny_tokenizer, tmp_path):
    trainer = KTOExtTrainer(
        model=small_model,
        args=cpu_args(tmp_path, per_device_eval_batch_size=4),
        train_dataset=make_kto_dataset(20, seed=7),
        eval_dataset=make_kto_dataset(12, seed=8, split="heldout"),
        processing_class=tiny_tokenizer,
    )
    first = trainer.evaluate()
    second = trainer.evaluate()
    assert first["eval_kl_raw"] == second["eval_kl_raw"] and first["eval_loss"] == second["eval_loss"]
