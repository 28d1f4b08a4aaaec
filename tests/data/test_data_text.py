"""Text columns of data files are read as text: a CSV answer `27` (or `007`) or a JSON number is the completion
text the user wrote, not a refused number; labels keep their meaning."""

from __future__ import annotations

import json

from data_helpers import _hf_cache_in_tmp  # noqa: F401  (the fixture is autouse)

from trl_kto_ext.data.loading import load_unpaired_dataset


def test_csv_numbers_are_text(tmp_path):
    path = tmp_path / "math.csv"
    path.write_text("prompt,completion,label\nWhat is 18+9?,27,True\nWhat is 3+4?,007,False\nWhat is 1+1?,2.50,good\n")
    ds = load_unpaired_dataset(str(path))
    assert ds["completion"] == ["27", "007", "2.50"]
    assert ds["label"] == [True, False, True]


def test_csv_numbers_in_mapped_and_paired_columns(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("question,good_answer,bad_answer\n18+9,27,28\n3+4,7,8\n")
    ds = load_unpaired_dataset(str(path), prompt_column="question", chosen_column="good_answer",
                               rejected_column="bad_answer", seed=None)  # fmt: skip
    assert ds["prompt"] == ["18+9", "18+9", "3+4", "3+4"]
    assert ds["completion"] == ["27", "28", "7", "8"]
    assert ds["label"] == [True, False, True, False]


def test_jsonl_numbers_are_text(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"prompt": "What is 18+9?", "completion": 27, "label": 1}, {"prompt": 5, "completion": 2.5, "label": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_unpaired_dataset(str(path))
    assert ds["prompt"] == ["What is 18+9?", "5"]
    assert ds["completion"] == ["27", "2.5"]  # as written: not 27.0, the float64 Arrow infers for the column
    assert ds["label"] == [True, False]


def test_csv_folder_and_parquet_numbers_are_text(tmp_path):
    import pandas as pd

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.csv").write_text("prompt,completion,label\nWhat is 18+9?,27,True\n")
    (folder / "b.csv").write_text("prompt,completion,label\nWhat is 3+4?,007,False\n")
    ds = load_unpaired_dataset(str(folder))
    assert sorted(zip(ds["completion"], ds["label"])) == [("007", False), ("27", True)]
    pd.DataFrame({"prompt": ["What is 18+9?", "What is 3+4?"], "completion": [27, 8], "label": [1, 0]}).to_parquet(
        tmp_path / "d.parquet"
    )
    ds = load_unpaired_dataset(str(tmp_path / "d.parquet"))
    assert ds["completion"] == ["27", "8"] and ds["label"] == [True, False]
