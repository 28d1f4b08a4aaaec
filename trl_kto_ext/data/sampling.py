"""Sequence lengths for transformers' length-aware samplers (`group_by_length`, `batch_rebalance`) on KTO rows."""

from __future__ import annotations

LENGTH_AWARE = ("group_by_length", "batch_rebalance")
STRATEGIES = ("random", "sequential", *LENGTH_AWARE)


def with_lengths(dataset, args, source=None):
    """`dataset` with a column `args.length_column_name` holding each row's token count, where the sampler needs one.

    transformers infers lengths only from an `input_ids` column; tokenized KTO rows hold `prompt_ids` and
    `completion_ids`, so the length of a row is len(prompt_ids) + len(completion_ids), capped at `args.max_length`
    (the collator truncates there). Returned unchanged for other strategies, for a stream (no sampler), and when the
    column already exists. `source` is the dataset before transformers pruned its columns (which removes a length
    column the user gave): its length column is used when present.

    Raises:
        ValueError: a length-aware strategy on rows that are tokenized only when collated (vision data).
    """
    from datasets import Dataset  # here, not at the top: config.py reads STRATEGIES, and `--help` stays light

    column = args.length_column_name
    if (
        isinstance(dataset, Dataset)
        and isinstance(source, Dataset)
        and column not in dataset.column_names
        and column in source.column_names
        and len(source) == len(dataset)
    ):
        dataset = dataset.add_column(column, source[column])
    if not check_lengths(dataset, args):
        return dataset
    columns = dataset.select_columns(["prompt_ids", "completion_ids"]).with_format("arrow")
    lengths = [
        len(p) + len(c) for p, c in zip(columns["prompt_ids"].to_pylist(), columns["completion_ids"].to_pylist())
    ]
    if args.max_length is not None:
        lengths = [min(length, args.max_length) for length in lengths]
    return dataset.add_column(column, lengths)


def check_lengths(dataset, args) -> bool:
    """Whether the sampler needs lengths computed from `prompt_ids` / `completion_ids` (False: none or given).

    Raises:
        ValueError: a length-aware strategy on rows that are tokenized only when collated (vision data) and have no
            `args.length_column_name` column.
    """
    from datasets import Dataset

    strategy = args.train_sampling_strategy
    if strategy not in LENGTH_AWARE or not isinstance(dataset, Dataset):
        return False
    column = args.length_column_name
    if column in dataset.column_names:
        return False
    if not {"prompt_ids", "completion_ids"} <= set(dataset.column_names):
        raise ValueError(
            f"train_sampling_strategy={strategy!r} needs each row's length, but these rows are tokenized only when "
            f"collated (columns: {sorted(dataset.column_names)}, e.g. vision data). Add a `{column}` column of token "
            "counts (`length_column_name`), or use train_sampling_strategy='random'."
        )
    return True
