"""Faults a new user hits, each with the message they must see: a YAML syntax error at its own line, a Hub id with
no Hub (fast, one line), column hints in the caller's words, and max_length within the model's positions."""

from __future__ import annotations

import json
import time

import datasets
import pytest
from conftest import cpu_args
from data_helpers import _hf_cache_in_tmp  # noqa: F401  (the fixture is autouse)
from datasets import Dataset

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.__main__ import main
from trl_kto_ext.data.loading import prepare_unpaired


def _error(argv, capsys=None) -> str:
    with pytest.raises(SystemExit) as info:  # a SystemExit with a message, never another exception's traceback
        main(argv)
    assert info.value.code not in (0, None)
    return str(info.value.code)


# ------------------------------------------------------------------------------------------------------- YAML
def test_yaml_missing_colon_is_reported_at_its_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: tiny\ndataset_name: tiny-arithmetic\nmax_steps 5\nbeta: 0.1\n")
    assert _error(["--config", str(config)]) == (
        f"trl-kto-ext: error: malformed YAML in {config}, line 3, column 1: could not find expected ':' (write "
        "`key: value`, with a colon and a space); while scanning a simple key here, the parser stopped at line 4, "
        "column 1. Fix the syntax there."
    )


def test_yaml_unclosed_bracket_is_reported_where_it_opens(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("beta: 0.1\nlora_target_modules: [q_proj, v_proj\nmax_steps: 3\n")
    assert f"malformed YAML in {config}, line 2, column 22: expected ',' or ']'" in _error(["--config", str(config)])


# -------------------------------------------------------------------------------------------- Hub unreachable
HUB_ARGS = ["--model_name_or_path", "tiny", "--dataset_name", "my-org/missing-dataset"]


def test_hub_id_offline_fails_at_once_in_one_line(tmp_path, capfd):
    assert datasets.config.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1 before datasets is imported
    start = time.perf_counter()
    message = _error([*HUB_ARGS, "--output_dir", str(tmp_path)])
    print(f"\nHub id offline: failed after {time.perf_counter() - start:.2f} s")
    assert message == (
        "trl-kto-ext: error: 'my-org/missing-dataset' is not a local path, and with HF_HUB_OFFLINE=1 only the local "
        "Hub cache is read: it is not there. Pass a local .jsonl, .json, .csv, .parquet file or a dataset folder, or "
        "unset HF_HUB_OFFLINE on a machine with network access."
    )
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err and "HEAD" not in printed.err + printed.out


def test_hub_id_with_unreachable_hub_fails_at_once_in_one_line(tmp_path, capfd, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    start = time.perf_counter()
    message = _error([*HUB_ARGS, "--output_dir", str(tmp_path)])
    print(f"\nHub id, Hub unreachable: failed after {time.perf_counter() - start:.2f} s")
    assert message.startswith(
        "trl-kto-ext: error: 'my-org/missing-dataset' is not a local path, and the Hub (http://127.0.0.1:9) cannot be "
        "reached ("
    )
    assert message.endswith(
        "). Check the spelling of a local path, your network, or set HF_HUB_OFFLINE=1 to load a dataset from the "
        "local Hub cache."
    )
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err and "Retry" not in printed.err + printed.out


# ------------------------------------------------------------------------------------ messages in the user's words
def test_missing_column_names_the_flag_on_the_command_line(tmp_path):
    rows = [{"prompt": f"{a}+1=", "answer": str(a + 1), "label": a % 2 == 0} for a in range(6)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = _error(["--model_name_or_path", "tiny", "--dataset_name", str(data), "--output_dir", str(tmp_path)])
    assert "Map yours by passing --completion_column <your column>." in message
    assert "completion_column=" not in message


def test_missing_column_names_the_keyword_in_python():
    with pytest.raises(ValueError, match=r"Map yours by passing completion_column=<your column>\. "):
        prepare_unpaired(Dataset.from_dict({"prompt": ["1+1="], "answer": ["2"], "label": [True]}))


# ----------------------------------------------------------------------------------------------------- max_length
def _long_rows() -> Dataset:
    # BOS + 51-character prompt + 40-character completion + EOS = 93 tokens with the character-level tokenizer.
    prompts = [
        "Add the two numbers written here, please: 12 + 30 =",
        "Add the two numbers written here, please: 13 + 29 =",
    ]
    answer = " forty two, which is the sum of the two."
    return Dataset.from_dict({"prompt": prompts, "completion": [answer, answer[::-1]], "label": [True, False]})


def test_default_max_length_follows_the_model_positions(small_model, tiny_tokenizer, tmp_path, capsys):
    limit = small_model.config.max_position_embeddings
    assert (
        limit == 64 and len(tiny_tokenizer(_long_rows()[0]["prompt"] + _long_rows()[0]["completion"]).input_ids) > 90
    )
    args = cpu_args(tmp_path, per_device_train_batch_size=2)
    assert args.max_length == 1024  # TRL's default
    trainer = KTOExtTrainer(model=small_model, args=args, train_dataset=_long_rows(), processing_class=tiny_tokenizer)
    assert "max_length lowered from its default 1024 to 64, the model's max_position_embeddings." in (
        capsys.readouterr().out.splitlines()
    )
    assert trainer.args.max_length == limit
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == limit and batch["KL_input_ids"].shape[1] <= limit


def test_explicit_max_length_beyond_the_model_positions_is_an_error(small_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError) as err:
        KTOExtTrainer(model=small_model, args=cpu_args(tmp_path, max_length=100), train_dataset=_long_rows(),
                      processing_class=tiny_tokenizer)  # fmt: skip
    assert str(err.value) == (
        "max_length=100 is longer than the model supports: its max_position_embeddings is 64, so tokens past "
        "position 64 have no position embedding. Set max_length to 64 or less."
    )


def test_max_length_beyond_the_model_on_the_command_line(tiny_default, tmp_path):
    argv = ["--model_name_or_path", "tiny", "--dataset_name", "tiny-arithmetic", "--max_length", "100"]
    message = _error([*argv, "--tiny_train_rows", "16", "--eval_strategy", "no", "--output_dir", str(tmp_path)])
    assert message == (
        "trl-kto-ext: error: --max_length 100 is longer than the model supports: its max_position_embeddings is 64, "
        "so tokens past position 64 have no position embedding. Set --max_length to 64 or less."
    )
