"""Faults a new user hit following the README: eval KL rows, the eval hold-out, length advice, row numbers, labels."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import cpu_args
from datasets import Dataset

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.__main__ import main
from trl_kto_ext.data.eval_split import train_eval_split
from trl_kto_ext.data.loading import prepare_unpaired
from trl_kto_ext.data.validation import check_tokenized

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")


def _pairs(n_prompts: int) -> list[dict]:
    """One good and one bad answer per prompt: `a+b=` with the right sum and the sum plus one."""
    rows = []
    for i in range(n_prompts):
        a, b = 10 + i, 3 + i % 5
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b), "label": True})
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b + 1), "label": False})
    return rows


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cli(tmp_path, data: str, *extra: str) -> list[str]:
    return [
        "--config", TINY_CONFIG, "--model_name_or_path", "tiny", "--dataset_name", data, "--max_steps", "2",
        "--output_dir", str(tmp_path / "out"), "--logging_steps", "1", "--report_to", "none", "--disable_tqdm",
        "true", *extra,
    ]  # fmt: skip


def test_cli_with_20_prompts_holds_out_2_trains_evaluates_and_saves(tmp_path, capsys):
    data = _jsonl(tmp_path / "mine.jsonl", _pairs(20))
    assert main(_cli(tmp_path, data, "--eval_strategy", "steps", "--eval_steps", "2")) == 0
    out = capsys.readouterr().out
    assert (
        "No 'test' split: holding out 2 of 20 prompts (4 rows; eval_fraction=0.05 rounds to fewer than 2 prompts)."
        in out
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])


@pytest.mark.parametrize(
    ("n_prompts", "fraction", "expected"), [(20, 0.05, 2), (4, 0.05, 2), (3, 0.05, 1), (20, 0.3, 6)]
)
def test_split_holds_out_at_least_two_prompts_of_four(n_prompts, fraction, expected):
    dataset = Dataset.from_list(_pairs(n_prompts))
    lines = []
    train, held = train_eval_split(dataset, fraction, seed=0, report=lines.append)
    assert len(set(held["prompt"])) == expected and len(held) == 2 * expected
    assert not set(held["prompt"]) & set(train["prompt"]) and len(train) + len(held) == len(dataset)
    assert lines[0].startswith(f"holding out {expected} of {n_prompts} prompts ({2 * expected} rows;")


def test_evaluate_on_one_prompt_pairs_kl_rows_with_training_prompts(small_model, tiny_tokenizer, tmp_path):
    train = Dataset.from_list(_pairs(6))
    eval_set = Dataset.from_list(_pairs(1)[:2])  # 2 rows, 1 prompt
    args = cpu_args(tmp_path, per_device_eval_batch_size=2)
    trainer = KTOExtTrainer(small_model, args=args, train_dataset=train, processing_class=tiny_tokenizer)
    metrics = trainer.evaluate(eval_set)
    assert np.isfinite(metrics["eval_loss"])
    prepared = trainer._prepare_dataset(eval_set, tiny_tokenizer, args, "eval")
    batch = next(iter(trainer.get_eval_dataloader(prepared)))
    train_rows = {tuple(r["completion_ids"]): tuple(r["prompt_ids"]) for r in trainer.train_dataset}
    eval_prompt = tuple(prepared[0]["prompt_ids"])
    for ids, mask in zip(batch["KL_input_ids"].tolist(), batch["KL_completion_mask"].tolist()):
        completion = tuple(t for t, m in zip(ids, mask) if m)
        prompt = tuple(t for t, m, a in zip(ids, mask, batch["KL_attention_mask"][0].tolist()) if not m and a)
        assert prompt == eval_prompt  # the KL row's prompt is its own row's
        assert completion in train_rows and train_rows[completion] != eval_prompt  # written for another prompt


def test_no_other_prompt_anywhere_evaluates_with_z0_zero(small_model, tiny_tokenizer, tmp_path, caplog):
    # One prompt in the training set and in the evaluation set: no mismatched pair exists anywhere, so the run (its
    # evaluation too) has no z0 to estimate; it says so once and uses z0 = 0 rather than failing at the first eval.
    rows = _pairs(1)
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.trainer"):
        trainer = KTOExtTrainer(
            small_model, args=cpu_args(tmp_path), train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer,
        )  # fmt: skip
    assert caplog.text.count("Every training row has the same prompt") == 1
    metrics = trainer.evaluate(Dataset.from_list(rows))
    assert metrics["eval_kl"] == 0.0 and math.isfinite(metrics["eval_loss"])


def _tokenized(prompt_len: int, completion_len: int) -> Dataset:
    return Dataset.from_dict(
        {"prompt_ids": [[1] * prompt_len, [1] * 3], "completion_ids": [[2] * completion_len, [2] * 3]}
    )


def test_length_advice_within_the_model_limit(caplog):
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.data.validation"):
        check_tokenized(_tokenized(30, 50), 64, "train", position_limit=128)
    assert "Raise `max_length` to 80 to keep every row whole, or shorten them." in caplog.text


def test_dropped_and_truncated_rows_give_one_length_to_keep_every_row_whole(caplog):
    # a 70-token prompt (dropped at 64) + 4 = 74 tokens; a 20 + 55 = 75-token row (truncated): 75 keeps both whole
    data = Dataset.from_dict(
        {"prompt_ids": [[1] * 70, [1] * 20, [1] * 3], "completion_ids": [[2] * 4, [2] * 55, [2] * 3]}
    )
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.data.validation"):
        check_tokenized(data, 64, "train", position_limit=128)
    assert "dropped 1 of 3" in caplog.text and "truncated 1 of 3" in caplog.text
    assert caplog.text.count("Raise `max_length` to 75 to keep every row whole") == 2


def test_length_advice_past_the_model_limit(caplog):
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.data.validation"):
        check_tokenized(_tokenized(30, 432), 64, "train", position_limit=64)
    assert "Raise `max_length`" not in caplog.text
    assert (
        "Keeping every row whole needs 462 tokens, longer than the model can take (max_position_embeddings 64): "
        "shorten the rows, or use a model with a longer context." in caplog.text
    )


def test_bad_label_names_the_row_counting_from_0():
    rows = [dict(r, label="good" if r["label"] else "bad") for r in _pairs(4)]
    rows[7]["label"] = "maybe"
    with pytest.raises(ValueError, match=r"Unrecognised label 'maybe' at row 7 \(counting from 0\)\."):
        prepare_unpaired(Dataset.from_list(rows))


def test_malformed_message_is_named_by_its_file_row_despite_the_hold_out(tmp_path, capsys):
    rows = [
        dict(r, prompt=[{"role": "user", "content": r["prompt"]}], completion=[{"role": "assistant", "content": "1"}])
        for r in _pairs(20)
    ]
    rows[6]["prompt"] = [{"role": "user", "text": "no content key"}]
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(SystemExit) as err:
        main(_cli(tmp_path, data, "--eval_strategy", "steps"))
    assert "prompt at row 6 (counting from 0) of the train dataset" in str(err.value)


def test_one_class_in_python_is_a_one_line_notice(caplog, recwarn):
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.data.loading"):
        prepare_unpaired(Dataset.from_list([dict(r, label=True) for r in _pairs(2)]))
    assert caplog.messages == [
        "Only one label present (4 desirable, 0 undesirable): KTO trains on it, each row compared with z0 alone "
        "(auto loss aversion then uses lambda_D = lambda_U = 1); check the label column if you expected both."
    ]
    assert not recwarn.list


def test_misspelt_column_says_what_to_pass(tmp_path):
    with pytest.raises(SystemExit) as err:
        main(_cli(tmp_path, _jsonl(tmp_path / "d.jsonl", _pairs(4)), "--prompt_column", "promt"))
    assert str(err.value) == (
        "trl-kto-ext: error: Column 'promt' (--prompt_column) is not in the data; the data has 'prompt': pass "
        "--prompt_column 'prompt' (the default) or rename the column."
    )


def test_small_or_one_class_eval_split_is_said(capsys):
    from datasets import Dataset

    from trl_kto_ext.data.eval_split import train_eval_split

    rows = [{"prompt": f"q{i // 2}", "completion": f"a{i}", "label": i % 2 == 0 or i < 4} for i in range(40)]
    train, held_out = train_eval_split(Dataset.from_list(rows), 0.05, seed=0, report=print)
    out = capsys.readouterr().out
    n_des = sum(held_out["label"])
    n_und = len(held_out) - n_des
    assert f"note: the eval set has {n_des} desirable and {n_und} undesirable rows" in out
    assert "eval metrics on so few rows say little: raise eval_fraction or give a test split." in out
