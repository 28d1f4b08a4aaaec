"""Every train_sampling_strategy trains; group_by_length really groups rows of similar length."""

import pytest
from conftest import cpu_args
from datasets import Dataset
from test_streaming import RecordingTrainer

from trl_kto_ext import KTOExtConfig
from trl_kto_ext.data.sampling import STRATEGIES


def _rows(n=24, words=lambda i: i % 6 + 1):
    # Row i has a completion of words(i) words.
    return [
        {"prompt": f"Question {i}?", "completion": " " + " ".join(["word"] * words(i)), "label": i % 2 == 0}
        for i in range(n)
    ]


def _trainer(small_model, tokenizer, tmp_path, strategy, rows, **overrides):
    trainer = RecordingTrainer(
        small_model,
        args=cpu_args(tmp_path, train_sampling_strategy=strategy, **overrides),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.batches = []
    return trainer


def test_advertised_strategies_are_transformers_choices():
    from transformers import TrainingArguments

    choices = TrainingArguments.__dataclass_fields__["train_sampling_strategy"].metadata["choices"]
    assert set(STRATEGIES) == set(choices)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_two_steps(small_model, tiny_tokenizer, tmp_path, strategy):
    trainer = _trainer(small_model, tiny_tokenizer, tmp_path, strategy, _rows(), max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2
    assert [batch["input_ids"].size(0) for batch in trainer.batches] == [4, 4]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(loss == loss for loss in losses)


def test_group_by_length_batches_rows_of_similar_length(small_model, tiny_tokenizer, tmp_path):
    rows = _rows(64, words=lambda i: i + 1)  # every row its own length
    trainer = _trainer(
        small_model, tiny_tokenizer, tmp_path, "group_by_length", rows, per_device_train_batch_size=2, max_length=None
    )
    dataset = trainer.train_dataset
    lengths = [len(p) + len(c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"])]
    assert len(set(lengths)) == 64
    # One epoch of the training dataloader: the trainer's sampler and collator.
    flat = [n for batch in trainer.get_train_dataloader() for n in batch["attention_mask"].sum(-1).tolist()]
    assert sorted(flat) == sorted(lengths)  # every row once
    # transformers' LengthGroupedSampler: random mega-batches of min(64 // (2 * 4), 50) * 2 = 16 rows, each sorted by
    # length (longest first), then the overall longest row swapped into the first place. A random order would have
    # each mega-batch (past its first row) sorted with chance 1/15!.
    for start in range(0, 64, 16):
        megabatch = flat[start + 1 : start + 16]
        assert megabatch == sorted(megabatch, reverse=True)
    assert flat[0] == max(lengths)


def test_unknown_strategy_is_refused_when_the_config_is_built(tmp_path):
    with pytest.raises(ValueError, match="`train_sampling_strategy` must be one of 'random', 'sequential', "):
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, train_sampling_strategy="by_length")
