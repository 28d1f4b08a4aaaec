"""Paired data (prompt, chosen, rejected) to unpaired KTO rows, each pair's two rows side by side: the one conversion
used by `prepare_unpaired`, the command line and `KTOExtTrainer`."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset, Value

from trl_kto_ext.data.labels import decode_labels


def _plain(dataset: Dataset) -> Dataset:
    # A torch/numpy format would hand us tensors instead of Python values.
    return dataset.with_format(None)


def _check_dataset(dataset: Any) -> Dataset:
    if isinstance(dataset, DatasetDict):
        raise ValueError(f"Expected one split, got a DatasetDict ({sorted(dataset)}); pass e.g. dataset['train'].")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"Expected a datasets.Dataset, got {type(dataset).__name__}; use Dataset.from_list(...).")
    return dataset


def unpair_paired_dataset(dataset, seed: int | None = 0):
    """Turn (prompt, chosen, rejected) pairs into alternating (prompt, chosen, True), (prompt, rejected, False) rows.

    The one conversion of paired data, used by `prepare_unpaired`, the CLI and `KTOExtTrainer`. Pairs are shuffled
    with `seed` (`None` keeps their order); each pair's two rows are adjacent, chosen first, so labels strictly
    alternate and every window of two or more consecutive rows holds both labels (sequential batches always mix).
    Extra columns are copied to both rows. A conversational pair without a `prompt` column has its shared leading
    messages moved to `prompt` (TRL's `maybe_extract_prompt`). An `IterableDataset` is converted lazily, in order.
    Prints one line, e.g. `40 pairs -> 80 unpaired rows, interleaved`.
    """
    if isinstance(dataset, IterableDataset):
        return _unpair_stream(dataset)
    dataset = _check_dataset(dataset)
    dataset = _extract_prompt(dataset)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Paired data needs prompt, chosen, rejected; missing {missing} in {dataset.column_names}.")
    if clash := [c for c in ("completion", "label") if c in dataset.column_names]:
        raise ValueError(f"Paired data already has column(s) {clash}, which unpairing creates; drop them first.")
    n = len(dataset)
    chosen = dataset.remove_columns("rejected").rename_column("chosen", "completion")
    rejected = dataset.remove_columns("chosen").rename_column("rejected", "completion")
    chosen = chosen.add_column("label", [True] * n, feature=Value("bool"))
    rejected = rejected.add_column("label", [False] * n, feature=Value("bool"))
    try:  # chosen/rejected may have been inferred with different arrow types (e.g. one column all-null)
        rejected = rejected.cast(chosen.features)
    except (TypeError, ValueError) as err:
        raise ValueError(f"chosen/rejected types differ ({err}); make both text or both message lists.") from None
    # Concatenate then reorder through an index map: no per-row Python copies of the text.
    order = np.empty(2 * n, dtype=np.int64)
    perm = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    order[0::2], order[1::2] = perm, perm + n
    _say(f"{n} pairs -> {2 * n} unpaired rows, interleaved")
    return datasets.concatenate_datasets([chosen, rejected]).select(order)


def as_unpaired(dataset, seed: int | None = None):
    """Any dataset the trainer accepts, as unpaired rows with boolean labels (the trainer's entry conversion).

    A `ClassLabel` label column becomes booleans by its class names (ValueError for names it cannot read); paired
    rows go through `unpair_paired_dataset` (pairs kept side by side; `seed=None` keeps their order). Other
    datasets and types are returned unchanged.
    """
    if not isinstance(dataset, (Dataset, IterableDataset)):
        return dataset
    columns = dataset.column_names
    if columns is None:  # a stream without known features: look at its first row
        columns = list(next(iter(dataset), {}))
    if is_paired(columns):
        return unpair_paired_dataset(dataset, seed=seed)
    return decode_labels(dataset) if "label" in columns else dataset


def is_paired(columns) -> bool:
    """Whether rows with these columns are paired (chosen/rejected) rather than unpaired (completion/label)."""
    columns = set(columns)
    return {"chosen", "rejected"} <= columns and not {"completion", "label"} <= columns


def _extract_prompt(dataset: Dataset) -> Dataset:
    if "prompt" in dataset.column_names or not len(dataset) or not isinstance(_plain(dataset)[0]["chosen"], list):
        return dataset
    from trl import maybe_extract_prompt  # lazy: importing trl is slow

    return dataset.map(maybe_extract_prompt, desc="Extracting prompts")


def _unpair_stream(dataset: IterableDataset) -> IterableDataset:
    from trl import maybe_extract_prompt

    def interleave(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out: dict[str, list] = {}
        for row in rows:
            row = maybe_extract_prompt(row) if "prompt" not in row else row
            chosen, rejected = row.pop("chosen"), row.pop("rejected")
            for completion, label in ((chosen, True), (rejected, False)):
                for key, value in {**row, "completion": completion, "label": label}.items():
                    out.setdefault(key, []).append(value)
        return out

    _say("paired stream -> unpaired rows (2 per pair), interleaved")
    return dataset.map(interleave, batched=True, remove_columns=["chosen", "rejected"])


def _say(message: str) -> None:
    from accelerate import PartialState

    if not PartialState._shared_state or PartialState().is_main_process:
        print(message, flush=True)
