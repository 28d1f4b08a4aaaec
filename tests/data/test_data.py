"""Tests for trl_kto_ext.data.loading: loading every local format, label normalisation, validation messages, unpairing."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from data_helpers import ROWS, _hf_cache_in_tmp, _write  # noqa: F401  (the fixture is autouse)
from datasets import Dataset

from trl_kto_ext.data.loading import (
    count_labels,
    load_unpaired_dataset,
    normalize_label,
    prepare_unpaired,
)


def _key(row: dict) -> tuple:
    return (row["prompt"], row["completion"])


@pytest.mark.parametrize(
    "fmt", ["jsonl", "json", "csv", "parquet", "save_to_disk", "save_to_disk_dict", "jsonl_folder"]
)
def test_each_format_round_trips(tmp_path, fmt):
    ds = load_unpaired_dataset(_write(tmp_path, fmt, ROWS))
    assert sorted(ds.to_list(), key=_key) == sorted(ROWS, key=_key)
    assert ds.features["label"] == datasets.Value("bool")


def test_csv_with_string_labels(tmp_path):
    rows = [dict(r, label="thumbs_up" if r["label"] else "thumbs_down") for r in ROWS]
    ds = load_unpaired_dataset(_write(tmp_path, "csv", rows))
    assert ds["label"] == [r["label"] for r in ROWS]
    assert ds.column_names == ["prompt", "completion", "label", "source"]  # column order kept


def test_conversational_rows_pass_through(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
            "label": 1,
        },
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Go away"}],
            "label": 0,
        },
    ]
    ds = load_unpaired_dataset(_write(tmp_path, "jsonl", rows))
    assert ds[0]["completion"] == [{"role": "assistant", "content": "Hello"}]
    assert ds["label"] == [True, False]


# ---------------------------------------------------------------- labels

TRUE_VALUES = [True, np.bool_(True), 1, 1.0, np.int64(1), np.float32(1.0), "true", " TRUE ", "1", "desirable", "Good"]
TRUE_VALUES += ["up", "thumbs_up", "Thumbs-Up", "👍", "yes", "positive", "chosen"]
FALSE_VALUES = [False, np.bool_(False), 0, 0.0, np.int64(0), "false", "False", "0", "undesirable", "BAD", "down"]
FALSE_VALUES += ["thumbs_down", "👎", "no", "negative", "rejected"]


@pytest.mark.parametrize("value", TRUE_VALUES)
def test_normalize_label_true(value):
    assert normalize_label(value, row=0) is True


@pytest.mark.parametrize("value", FALSE_VALUES)
def test_normalize_label_false(value):
    assert normalize_label(value, row=0) is False


@pytest.mark.parametrize("value", ["maybe", None, 2, 0.5, -1, float("nan"), "", [1]])
def test_normalize_label_rejects(value):
    with pytest.raises(ValueError) as info:
        normalize_label(value, row=7)
    message = str(info.value)
    assert repr(value) in message and "row 7" in message and "'desirable'" in message


def test_prepare_names_first_bad_label():
    ds = Dataset.from_dict(
        {"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"], "label": ["good", "maybe", "??"]}
    )
    with pytest.raises(ValueError, match=r"'maybe' at row 1 \(counting from 0\)"):
        prepare_unpaired(ds)


def test_count_labels():
    ds = Dataset.from_dict({"label": [True, False, True]})
    assert count_labels(ds) == (2, 1)
    with pytest.raises(ValueError, match=r"row 1 \(counting from 0\) is None, not a bool"):
        count_labels(Dataset.from_dict({"label": [True, None]}))
    with pytest.raises(ValueError, match=r"row 0 \(counting from 0\) is 'yes', not a bool"):
        count_labels(Dataset.from_dict({"label": ["yes", "no"]}))
    with pytest.raises(ValueError, match="No 'label' column"):
        count_labels(Dataset.from_dict({"x": [1]}))


# ---------------------------------------------------------------- columns and validation


def test_column_mapping_keeps_extra_columns():
    ds = Dataset.from_dict({"question": ["q1", "q2"], "answer": ["a1", "a2"], "rating": ["up", "down"], "id": [1, 2]})
    out = prepare_unpaired(ds, prompt_column="question", completion_column="answer", label_column="rating")
    assert out.to_list() == [
        {"prompt": "q1", "completion": "a1", "label": True, "id": 1},
        {"prompt": "q2", "completion": "a2", "label": False, "id": 2},
    ]


def test_missing_column_message():
    ds = Dataset.from_dict({"prompt": ["p"], "response": ["r"], "label": [True]})
    with pytest.raises(ValueError) as info:
        prepare_unpaired(ds)
    message = str(info.value)
    assert "completion" in message and "'response'" in message and "completion_column=" in message


def test_mapped_column_that_does_not_exist():
    ds = Dataset.from_dict({"prompt": ["p"], "completion": ["c"], "label": [True]})
    with pytest.raises(ValueError, match=r"looked for column 'score'.*label_column="):
        prepare_unpaired(ds.rename_column("label", "rating"), label_column="score")


def test_ambiguous_mapping():
    ds = Dataset.from_dict({"prompt": ["p"], "completion": ["c"], "response": ["r"], "label": [True]})
    with pytest.raises(ValueError, match=r"both column 'response' \(completion_column\) and column 'completion'"):
        prepare_unpaired(ds, completion_column="response")
    with pytest.raises(
        ValueError,
        match=r"Column 'score' \(label_column\) is not in the data; the data has 'label': pass label_column='label'",
    ):
        prepare_unpaired(ds, label_column="score")


def test_empty_completion_message():
    ds = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", "y", "   "], "label": [True, False, True]})
    with pytest.raises(ValueError, match=r"completion at row 2 \(counting from 0\) is empty"):
        prepare_unpaired(ds)


def test_empty_conversational_prompt_message():
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "completion": [{"role": "assistant", "content": "yo"}],
                "label": True,
            },
            {
                "prompt": [{"role": "user", "content": " "}],
                "completion": [{"role": "assistant", "content": "yo"}],
                "label": False,
            },
        ]
    )
    with pytest.raises(ValueError, match=r"prompt at row 1 \(counting from 0\) is empty"):
        prepare_unpaired(ds)


def test_zero_rows(tmp_path):
    empty = Dataset.from_dict({"prompt": [], "completion": [], "label": []})
    with pytest.raises(ValueError, match="0 rows"):
        prepare_unpaired(empty)
    rows = [{"prompt": f"p{i}", "completion": "c", "label": i < 3} for i in range(10)]
    with pytest.raises(
        ValueError, match=r"desirable_fraction=0.1 keeps 0 of the 3 desirable rows \(0.1 x 3 rounds to 0\)"
    ):
        load_unpaired_dataset(_write(tmp_path, "jsonl", rows), desirable_fraction=0.1)  # 0.3 rounds to 0 rows
    # A class absent from the data stays absent: the other class is subsampled, nothing is refused.
    one_class = load_unpaired_dataset(_write(tmp_path, "jsonl", rows[3:]), desirable_fraction=0.5)
    assert count_labels(one_class) == (0, 7)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(ROWS[0])
    path.write_text(f'{good}\n{good}\n{{"prompt": "x", broken\n{good}\n')
    with pytest.raises(ValueError) as info:
        load_unpaired_dataset(str(path))
    assert str(path) in str(info.value) and "line 3" in str(info.value)
    assert not isinstance(info.value, datasets.exceptions.DatasetsError)


def test_malformed_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"prompt": "a", "completion": "b", "label": true},\n{"prompt": }\n]')
    with pytest.raises(ValueError, match=rf"{path}.*line 3"):
        load_unpaired_dataset(str(path))


def test_malformed_csv_names_file(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("prompt,completion,label\na,b,1\nc,d,e,1\n")
    with pytest.raises(ValueError) as info:
        load_unpaired_dataset(str(path))
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        load_unpaired_dataset(str(path))
    assert str(path) in str(info.value) and ".jsonl, .json, .csv, .parquet" in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_unpaired_dataset(str(tmp_path / "no" / "such" / "folder"))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match=r"Unsupported file type '\.txt'"):
        load_unpaired_dataset(str(path))


def test_missing_split(tmp_path):
    with pytest.raises(ValueError, match=r"'validation'.*\['train'\]"):
        load_unpaired_dataset(_write(tmp_path, "jsonl", ROWS), split="validation")
    with pytest.raises(ValueError, match=r"'validation'.*\['test', 'train'\]"):
        load_unpaired_dataset(_write(tmp_path, "save_to_disk_dict", ROWS), split="validation")
    assert len(load_unpaired_dataset(_write(tmp_path, "save_to_disk_dict", ROWS), split="test")) == 2


def test_hub_id_uses_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_unpaired_dataset("some-org/some-kto-data", dataset_config="cfg", split="test")
    assert calls == [("some-org/some-kto-data", "cfg", "test")] and len(ds) == 4
