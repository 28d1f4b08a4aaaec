"""Streamed training data (IterableDataset): KL rows paired across batches, auto loss aversion, the CLI flag."""

import json
import math

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset

from trl_kto_ext import KTOExtTrainer

N_ROWS = 16


def _rows(n=N_ROWS, offset=0):
    # One prompt per row; a 1:3 desirable:undesirable ratio (rows 0, 4, 8, ... desirable).
    return [
        {"prompt": f"Question {i + offset}?", "completion": f" answer {i + offset}", "label": i % 4 == 0}
        for i in range(n)
    ]


class RecordingTrainer(KTOExtTrainer):
    """Keeps every collated batch the trainer computes a loss on (training and evaluation)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.batches.append({k: v.detach().cpu() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return super().compute_loss(model, inputs, *args, **kwargs)


def _trainer(small_model, tokenizer, tmp_path, train, **overrides):
    trainer = RecordingTrainer(
        small_model, args=cpu_args(tmp_path, **overrides), train_dataset=train, processing_class=tokenizer
    )
    trainer.batches = []
    return trainer


def _split_rows(input_ids, attention_mask, completion_mask):
    """[(prompt tokens, completion tokens)] of a collated batch (padding left out)."""
    out = []
    for ids, attn, comp in zip(input_ids.tolist(), attention_mask.tolist(), completion_mask.tolist()):
        prompt = tuple(t for t, a, c in zip(ids, attn, comp) if a and not c)
        completion = tuple(t for t, a, c in zip(ids, attn, comp) if a and c)
        out.append((prompt, completion))
    return out


def _assert_kl_rows_pair_other_prompts(batches, prompt_of_completion):
    """Row i of the KL batch is prompt i + a completion written for a different prompt of `prompt_of_completion`."""
    n_rows = 0
    for batch in batches:
        targets = _split_rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        kl_rows = _split_rows(batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
        for (prompt, _), (kl_prompt, kl_completion) in zip(targets, kl_rows, strict=True):
            assert kl_prompt == prompt
            assert kl_completion in prompt_of_completion, "a KL completion that is no completion of the data"
            assert prompt_of_completion[kl_completion] != prompt
            n_rows += 1
    return n_rows


def _prompt_of_completion(trainer, rows):
    tokenized = trainer._prepare_dataset(Dataset.from_list(rows), trainer.processing_class, trainer.args, "eval")
    return {tuple(r["completion_ids"]): tuple(r["prompt_ids"]) for r in tokenized}


def test_stream_with_batch_size_one_pairs_every_kl_row_with_another_prompt(small_model, tiny_tokenizer, tmp_path):
    stream = Dataset.from_list(_rows()).to_iterable_dataset()
    trainer = _trainer(small_model, tiny_tokenizer, tmp_path, stream, per_device_train_batch_size=1, max_steps=6)
    trainer.train()
    assert trainer.state.global_step == 6 and len(trainer.batches) == 6
    assert _assert_kl_rows_pair_other_prompts(trainer.batches, _prompt_of_completion(trainer, _rows())) == 6
    kl_raw = [h["kl_raw"] for h in trainer.state.log_history if "kl_raw" in h]
    assert len(kl_raw) == 6 and all(math.isfinite(v) for v in kl_raw)


def test_eval_with_batch_size_one_pairs_within_the_eval_set(small_model, tiny_tokenizer, tmp_path):
    stream = Dataset.from_list(_rows()).to_iterable_dataset()
    eval_rows = _rows(8, offset=100)  # 8 prompts never seen in training
    trainer = _trainer(small_model, tiny_tokenizer, tmp_path, stream, per_device_eval_batch_size=1)
    metrics = trainer.evaluate(Dataset.from_list(eval_rows))
    assert len(trainer.batches) == 8
    # Every KL completion is another eval prompt's: the eval set itself is the fallback, not the training stream.
    assert _assert_kl_rows_pair_other_prompts(trainer.batches, _prompt_of_completion(trainer, eval_rows)) == 8
    assert math.isfinite(metrics["eval_kl_raw"])


def test_auto_loss_aversion_counts_the_stream(small_model, tiny_tokenizer, tmp_path, capsys):
    rows = _rows()
    trainer = _trainer(small_model, tiny_tokenizer, tmp_path, Dataset.from_list(rows).to_iterable_dataset())
    n_d = sum(r["label"] for r in rows)
    n_u = len(rows) - n_d
    assert (n_d, n_u) == (4, 12)
    assert trainer.desirable_weight == pytest.approx(1.0 * n_u / n_d) and trainer.undesirable_weight == 1.0
    trainer.train()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KTO loss aversion"))
    assert line == (
        "KTO loss aversion (auto, counted from all 16 rows of the stream): lambda_D=3, lambda_U=1, n_D=4, n_U=12, "
        "lambda_D*n_D/(lambda_U*n_U)=1 (paper advises [1, 4/3])"
    )
    # The look-ahead used its own iterator: training still started at the first row of the stream.
    first = trainer.batches[0]
    assert first["label"].tolist() == [r["label"] for r in rows[:4]]


def test_auto_loss_aversion_reads_a_bounded_look_ahead(small_model, tiny_tokenizer, tmp_path):
    rows = _rows()
    rows[5]["label"] = True  # first 6 rows: 3 desirable (0, 4, 5), 3 undesirable
    stream = Dataset.from_list(rows).to_iterable_dataset()
    trainer = _trainer(small_model, tiny_tokenizer, tmp_path, stream, loss_aversion_stream_rows=6)
    n_d = sum(r["label"] for r in rows[:6])
    assert trainer.loss_aversion.counted_from == "the first 6 rows of the stream"
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (n_d, 6 - n_d)
    assert trainer.desirable_weight == pytest.approx((6 - n_d) / n_d)


def test_stream_whose_look_ahead_holds_one_class_trains_and_says_what_to_do(
    small_model, tiny_tokenizer, tmp_path, capsys
):
    rows = sorted(_rows(), key=lambda r: not r["label"])  # the 4 desirable rows first
    stream = Dataset.from_list(rows).to_iterable_dataset()
    trainer = _trainer(small_model, tiny_tokenizer, tmp_path, stream, loss_aversion_stream_rows=4, max_steps=2)
    assert (trainer.desirable_weight, trainer.undesirable_weight) == (1.0, 1.0)  # auto cannot balance what it saw
    trainer.train()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KTO loss aversion"))
    assert line.startswith(
        "KTO loss aversion (auto, counted from the first 4 rows of the stream): lambda_D=1, lambda_U=1, n_D=4, n_U=0: "
        "only desirable rows"
    )
    assert "If undesirable rows come later in the stream, shuffle it (`dataset.shuffle(buffer_size=...)`)" in line
    assert "loss_aversion_stream_rows" in line and "loss_aversion='manual'" in line


def test_stream_of_one_class_read_whole_trains_without_the_stream_advice(
    small_model, tiny_tokenizer, tmp_path, capsys
):
    rows = [row for row in _rows() if not row["label"]]  # 12 undesirable rows, all counted
    trainer = _trainer(small_model, tiny_tokenizer, tmp_path, Dataset.from_list(rows).to_iterable_dataset())
    trainer.train()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KTO loss aversion"))
    assert line.startswith("KTO loss aversion (auto, counted from all 12 rows of the stream): lambda_D=1, lambda_U=1")
    assert "only undesirable rows" in line and "stream, shuffle" not in line
    assert trainer.state.global_step == 3


def test_cli_streams_a_local_jsonl_file(tiny_default, tmp_path, capsys):
    from test_cli import TINY_CONFIG

    from trl_kto_ext.__main__ import main

    rows = [{"question": f"{a}+{a}=", "answer": str(2 * a + (a % 2)), "label": a % 3 == 0} for a in range(24)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["--config", TINY_CONFIG, "--dataset_name", str(data), "--dataset_streaming", "true"]
    argv += ["--prompt_column", "question", "--completion_column", "answer", "--output_dir", str(out)]
    argv += ["--max_steps", "3", "--per_device_train_batch_size", "4", "--eval_strategy", "no"]
    argv += ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1"]
    assert main(argv) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert len([h for h in state["log_history"] if "loss" in h]) == 3
    n_d = sum(r["label"] for r in rows)
    printed = capsys.readouterr().out
    assert f"KTO loss aversion (auto, counted from all 24 rows of the stream): lambda_D={(24 - n_d) / n_d:.4g}" in (
        printed
    )


def test_cli_streaming_refuses_class_fractions(tmp_path):
    from test_cli import TINY_CONFIG, _error

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    argv = ["--config", TINY_CONFIG, "--dataset_name", str(data), "--dataset_streaming", "true"]
    message = _error([*argv, "--output_dir", str(tmp_path / "run"), "--desirable_fraction", "0.5"])
    assert "--desirable_fraction / --undesirable_fraction need the whole dataset" in message
