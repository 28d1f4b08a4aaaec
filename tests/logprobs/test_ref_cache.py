"""The precomputed reference log-probs: right values from one sorted pass, reused from disk only for the same model
and data."""

import copy
import logging

import pytest
import torch
from conftest import cpu_args
from test_fast_path import odd_length_dataset, padded_logps
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from trl_kto_ext import KTOExtTrainer


def build(model, tokenizer, tmp_path, dataset, **overrides):
    """A trainer whose reference log-probs are precomputed into `tmp_path/cache`, and the number of forward calls
    of `model` that set-up made."""
    settings = dict(
        per_device_train_batch_size=4,
        precompute_ref_log_probs=True,
        kl_pairing="dataset",
        ref_cache_dir=str(tmp_path / "cache"),
    )
    args = cpu_args(tmp_path / "out", **{**settings, **overrides})
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        trainer = KTOExtTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    finally:
        hook.remove()
    return trainer, len(calls)


def test_second_run_reads_the_cache_and_changes_miss(small_model, tiny_tokenizer, tmp_path, caplog):
    initial = copy.deepcopy(small_model)
    data = odd_length_dataset(21, seed=5)
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.logprobs.ref_cache"):
        first, first_calls = build(copy.deepcopy(initial), tiny_tokenizer, tmp_path, data)
    assert "cache miss" in caplog.text and str(tmp_path / "cache") in caplog.text
    assert first_calls > 0
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1

    # values: the straightforward padded computation, row by row, for the targets and their KL rows
    collate = DataCollatorForUnpairedPreference(pad_token_id=tiny_tokenizer.pad_token_id)
    rows = [first.train_dataset[i] for i in range(len(first.train_dataset))]
    batch = collate([{k: r[k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label")} for r in rows])
    keys = ("input_ids", "attention_mask", "completion_mask")
    expected = padded_logps(initial, *(batch[k] for k in keys))
    expected_kl = padded_logps(initial, *(batch[f"KL_{k}"] for k in keys))
    got = torch.tensor(first.train_dataset["ref_logps"], dtype=torch.float64)
    got_kl = torch.tensor(first.train_dataset["ref_KL_logps"], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-5, atol=0)
    assert torch.allclose(got_kl, expected_kl, rtol=1e-5, atol=0)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.logprobs.ref_cache"):
        second, second_calls = build(copy.deepcopy(initial), tiny_tokenizer, tmp_path, data)
    assert "cache hit" in caplog.text and str(files[0]) in caplog.text
    assert second_calls == 0  # no reference forward at all
    assert second.train_dataset["ref_logps"] == first.train_dataset["ref_logps"]
    assert second.train_dataset["ref_KL_logps"] == first.train_dataset["ref_KL_logps"]

    changed = copy.deepcopy(initial)
    with torch.no_grad():
        changed.model.norm.weight[0] += 1e-3  # one weight of the reference
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.logprobs.ref_cache"):
        _, calls = build(changed, tiny_tokenizer, tmp_path, data)
    assert "cache miss" in caplog.text and calls > 0

    other = data.map(lambda row, i: {"completion": row["completion"] + ("x" if i == 7 else "")}, with_indices=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.logprobs.ref_cache"):
        _, calls = build(copy.deepcopy(initial), tiny_tokenizer, tmp_path, other)
    assert "cache miss" in caplog.text and calls > 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_a_truncated_cache_file_is_recomputed(small_model, tiny_tokenizer, tmp_path, caplog):
    data = odd_length_dataset(9, seed=6)
    first, _ = build(copy.deepcopy(small_model), tiny_tokenizer, tmp_path, data)
    (path,) = (tmp_path / "cache").glob("*.pt")
    path.write_bytes(path.read_bytes()[:20])
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.logprobs.ref_cache"):
        second, calls = build(copy.deepcopy(small_model), tiny_tokenizer, tmp_path, data)
    assert "unreadable reference cache" in caplog.text and "cache miss" in caplog.text and calls > 0
    assert second.train_dataset["ref_logps"] == pytest.approx(first.train_dataset["ref_logps"], rel=1e-6)
