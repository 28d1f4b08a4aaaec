"""Shared pieces of the data tests: sample rows, a temporary datasets cache, and writers for every file format."""

import json

import datasets
import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

ROWS = [
    {"prompt": "What is 2+2?", "completion": "4", "label": True, "source": "math"},
    {"prompt": "What is 2+2?", "completion": "5", "label": False, "source": "math"},
    {"prompt": "Capital of France?", "completion": "Paris", "label": True, "source": "geo"},
    {"prompt": "Capital of France?", "completion": "Rome", "label": False, "source": "geo"},
]


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    # load_dataset writes Arrow caches; keep them inside tmp_path rather than ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _write(tmp_path, fmt: str, rows: list[dict]) -> str:
    """Write `rows` in format `fmt` under tmp_path and return the path to pass to load_unpaired_dataset."""
    df = pd.DataFrame(rows)
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        df.to_parquet(path)
    elif fmt == "save_to_disk":
        path = tmp_path / "saved"
        Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "save_to_disk_dict":
        path = tmp_path / "saved_dict"
        DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(rows[:2])).save_to_disk(str(path))
    elif fmt == "jsonl_folder":
        path = tmp_path / "folder"
        path.mkdir()
        for name, chunk in (("a.jsonl", rows[:2]), ("b.jsonl", rows[2:])):
            (path / name).write_text("".join(json.dumps(r) + "\n" for r in chunk))
    else:
        raise AssertionError(fmt)
    return str(path)
