"""Data loading (part 2): paired-to-unpaired conversion and label mixing, class subsampling, train/eval split."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import _hf_cache_in_tmp, _write  # noqa: F401  (the fixture is autouse)
from datasets import Dataset
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from trl_kto_ext.data import loading as data
from trl_kto_ext.data.eval_split import train_eval_split
from trl_kto_ext.data.loading import (
    count_labels,
    load_unpaired_dataset,
    prepare_unpaired,
    subsample_class,
    unpair_paired_dataset,
)

# ---------------------------------------------------------------- paired data


def _pairs(n: int) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [f"p{i}" for i in range(n)],
            "chosen": [f"good {i}" for i in range(n)],
            "rejected": [f"bad {i}" for i in range(n)],
        }
    )


def test_paired_conversion_rows_and_counts():
    ds = _pairs(5).add_column("id", list(range(5)))
    out = prepare_unpaired(ds)
    assert len(out) == 10 and count_labels(out) == (5, 5)
    assert set(out.column_names) == {"prompt", "completion", "label", "id"}
    for row in out:
        i = int(row["prompt"][1:])
        assert row["id"] == i and row["completion"] == (f"good {i}" if row["label"] else f"bad {i}")
    assert out["label"] == [True, False] * 5
    assert out["prompt"][0::2] == out["prompt"][1::2]  # both rows of a pair are adjacent


def test_paired_from_file_with_mapping(tmp_path):
    rows = [{"q": f"p{i}", "good": f"g{i}", "bad": f"b{i}"} for i in range(4)]
    ds = load_unpaired_dataset(
        _write(tmp_path, "parquet", rows), prompt_column="q", chosen_column="good", rejected_column="bad"
    )
    assert count_labels(ds) == (4, 4)


def test_paired_conversational_with_implicit_prompt():
    user = {"role": "user", "content": "Sky colour?"}
    ds = Dataset.from_list(
        [
            {
                "chosen": [user, {"role": "assistant", "content": "Blue"}],
                "rejected": [user, {"role": "assistant", "content": "Green"}],
            }
        ]
    )
    out = prepare_unpaired(ds)
    assert out["prompt"] == [[user], [user]]
    assert out["completion"] == [
        [{"role": "assistant", "content": "Blue"}],
        [{"role": "assistant", "content": "Green"}],
    ]


def _mixed_fraction(labels: list[bool], sampler, batch_size: int = 8) -> float:
    batches = list(BatchSampler(sampler, batch_size=batch_size, drop_last=False))
    return sum(len({labels[i] for i in batch}) == 2 for batch in batches) / len(batches)


def test_unpaired_batches_mix_labels():
    from trl.data_utils import unpair_preference_dataset

    pairs = _pairs(2000)
    ours = unpair_paired_dataset(pairs, seed=0)["label"]
    trl_labels = unpair_preference_dataset(pairs)["label"]
    assert len(ours) == len(trl_labels) == 4000
    random_mixed = _mixed_fraction(ours, RandomSampler(range(4000), generator=torch.Generator().manual_seed(0)))
    sequential_mixed = _mixed_fraction(ours, SequentialSampler(range(4000)))
    trl_sequential_mixed = _mixed_fraction(trl_labels, SequentialSampler(range(4000)))
    print(
        f"\nbatches of 8 holding both labels: ours random={random_mixed:.1%}, ours sequential={sequential_mixed:.1%}, "
        f"TRL unpair_preference_dataset sequential={trl_sequential_mixed:.1%}"
    )
    assert random_mixed >= 0.95
    assert sequential_mixed == 1.0
    assert trl_sequential_mixed < 0.05


def test_unpair_is_seeded():
    assert unpair_paired_dataset(_pairs(50), seed=1)["prompt"] == unpair_paired_dataset(_pairs(50), seed=1)["prompt"]
    assert unpair_paired_dataset(_pairs(50), seed=1)["prompt"] != unpair_paired_dataset(_pairs(50), seed=2)["prompt"]


# ---------------------------------------------------------------- class subsampling


def _balanced(n: int) -> Dataset:
    return Dataset.from_dict(
        {"prompt": [f"p{i}" for i in range(2 * n)], "completion": ["c"] * (2 * n), "label": [True, False] * n}
    )


def test_desirable_fraction_keeps_ten_percent():
    ds = _balanced(1000)
    out = subsample_class(ds, desirable_fraction=0.1, seed=3)
    assert count_labels(out) == (100, 1000)  # exact count: floor(0.1 * 1000 + 0.5) = 100 (round half up)
    undesirable = [r["prompt"] for r in ds if not r["label"]]
    assert [r["prompt"] for r in out if not r["label"]] == undesirable  # untouched, order kept
    again = subsample_class(ds, desirable_fraction=0.1, seed=3)
    other = subsample_class(ds, desirable_fraction=0.1, seed=4)
    assert again["prompt"] == out["prompt"] and other["prompt"] != out["prompt"]


def test_subsample_rounds_half_up_and_validates():
    assert count_labels(subsample_class(_balanced(25), desirable_fraction=0.1)) == (3, 25)  # 2.5 -> 3
    assert count_labels(subsample_class(_balanced(25), undesirable_fraction=0.5)) == (25, 13)  # 12.5 -> 13
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"desirable_fraction must be in \(0, 1\]"):
            subsample_class(_balanced(4), desirable_fraction=bad)


def test_load_with_fraction(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": "c", "label": i % 2 == 0} for i in range(200)]
    ds = load_unpaired_dataset(_write(tmp_path, "jsonl", rows), desirable_fraction=0.1, seed=0)
    assert count_labels(ds) == (10, 100)


# ---------------------------------------------------------------- train / eval split


def test_train_eval_split_keeps_prompt_groups_disjoint():
    prompts = [f"p{i}" for i in range(60) for _ in range(1 + i % 4)]
    ds = Dataset.from_dict({"prompt": prompts, "completion": ["c"] * len(prompts), "label": [True] * len(prompts)})
    train, evaluation = train_eval_split(ds, eval_fraction=0.2, seed=0)
    assert not set(train["prompt"]) & set(evaluation["prompt"])
    assert len(train) + len(evaluation) == len(ds)
    assert 0.2 * len(ds) <= len(evaluation) <= 0.2 * len(ds) + 4  # overshoot by at most one group
    assert train_eval_split(ds, 0.2, seed=0)[1]["prompt"] == evaluation["prompt"]


def test_train_eval_split_conversational_and_errors():
    conv = [[{"role": "user", "content": f"q{i % 5}"}] for i in range(20)]
    ds = Dataset.from_dict({"prompt": conv, "completion": ["c"] * 20})
    train, evaluation = train_eval_split(ds, 0.3)
    key = json.dumps
    assert not {key(p) for p in train["prompt"]} & {key(p) for p in evaluation["prompt"]}
    with pytest.raises(ValueError, match="share one prompt"):
        train_eval_split(Dataset.from_dict({"prompt": ["same"] * 3}), 0.5)
    with pytest.raises(ValueError, match=r"eval_fraction must be in \(0, 1\)"):
        train_eval_split(ds, 1.0)


def test_module_docstring():
    assert data.__doc__ and "\n" not in data.__doc__.strip()
