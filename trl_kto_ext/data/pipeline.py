"""The data path in one place: a dataset name to checked train and eval rows, each step in the order it runs."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, NamedTuple

from trl_kto_ext.models import TINY_DATASET

COLUMNS = ("prompt", "completion", "label", "chosen", "rejected", "weight", "score")


class PreparedData(NamedTuple):
    train: Any  # Dataset, or IterableDataset when streaming
    eval: Any | None  # None when no evaluation is asked for
    heldout: tuple[list[str], list[str]] | None  # (prompts, answers) of the tiny task's held-out split, else None


def prepare_datasets(
    dataset_name: str | None,
    *,
    split: str = "train",
    test_split: str = "test",
    dataset_config: str | None = None,
    columns: dict[str, str] | None = None,
    desirable_fraction: float = 1.0,
    undesirable_fraction: float = 1.0,
    eval_fraction: float = 0.05,
    want_eval: bool = True,
    streaming: bool = False,
    seed: int = 0,
    tiny_rows: tuple[int, int] = (2048, 256),
    scores: Any = None,
) -> PreparedData:
    """Train and eval rows of `dataset_name` for KTOExtTrainer, as the `trl-kto-ext` command prepares them.

    The steps, in order: (1) load the split (a local file or folder, or a Hub id: `loading.load_raw_dataset`);
    (2) map the columns named in `columns` (e.g. `{"prompt": "question"}`), unpair paired rows, decode the labels and
    refuse blank text (`loading.prepare_unpaired`); (3) the trainer's row checks, on the rows as loaded, so that a
    message names the row as in the user's file (`validation.check_dataset`); (4) the eval rows: `test_split`, else
    `eval_fraction` of the prompts held out (`eval_split.train_eval_split`); (5) keep `desirable_fraction` /
    `undesirable_fraction` of each class (`loading.subsample_class`). `TINY_DATASET` gives the embedded addition
    data and its held-out prompts instead. With `streaming` the rows are read lazily, mapped and decoded row by row.
    A `score` column without labels is labelled in step 2 by the `label_mode`, `desirable_threshold` and
    `score_weighting` of `scores` (the training config); with streaming, by the trainer.

    Raises `FileNotFoundError` or `ValueError` naming the problem and the fix.
    """
    if not dataset_name:
        raise ValueError(f"no dataset: set dataset_name (a data file or folder, a Hub id, or {TINY_DATASET}).")
    if dataset_name == TINY_DATASET:
        return _tiny(*tiny_rows, seed=seed, want_eval=want_eval, streaming=streaming)
    mapping = {f"{c}_column": (columns or {}).get(c, c) for c in COLUMNS}
    if streaming:
        if (desirable_fraction, undesirable_fraction) != (1.0, 1.0):
            raise ValueError(
                "desirable_fraction / undesirable_fraction need the whole dataset: not available with "
                "dataset_streaming."
            )
        return _streamed(dataset_name, split, test_split if want_eval else None, dataset_config, mapping)

    from trl_kto_ext.data.eval_split import train_eval_split
    from trl_kto_ext.data.loading import load_unpaired_dataset, subsample_class
    from trl_kto_ext.data.loading import logger as data_logger
    from trl_kto_ext.data.validation import check_dataset

    load = functools.partial(
        load_unpaired_dataset, dataset_name, dataset_config=dataset_config, seed=seed, scores=scores, **mapping
    )
    eval_set = None
    with _quiet(data_logger):  # a one-class training set is reported once, by the trainer
        train = load(split=split)  # steps 1 and 2
        check_dataset(train, None, "train")  # step 3
        if want_eval:  # step 4
            try:
                eval_set = load(split=test_split)
            except ValueError as err:
                if not str(err).startswith(f"Split {test_split!r} not") or not eval_fraction > 0:
                    raise
                report = functools.partial(print, f"No {test_split!r} split:")
                train, eval_set = train_eval_split(train, eval_fraction, seed=seed, report=report)
    if (desirable_fraction, undesirable_fraction) != (1.0, 1.0):  # step 5
        train = subsample_class(train, desirable_fraction, undesirable_fraction, seed=seed)
    return PreparedData(train, eval_set, None)


def _tiny(train_rows: int, eval_rows: int, *, seed: int, want_eval: bool, streaming: bool) -> PreparedData:
    from trl_kto_ext.models.tiny import heldout_prompts, make_kto_dataset

    train = make_kto_dataset(train_rows, seed=seed)
    eval_set = make_kto_dataset(eval_rows, seed=seed, split="heldout") if want_eval else None
    return PreparedData(train.to_iterable_dataset() if streaming else train, eval_set, heldout_prompts())


def _streamed(name: str, split: str, test_split: str | None, dataset_config: str | None, mapping: dict[str, str]):
    """`IterableDataset`s read lazily: columns mapped and labels decoded row by row; the trainer counts the loss
    aversion from a bounded look-ahead."""
    import datasets

    from trl_kto_ext.data.labels import decode_labels, normalize_label
    from trl_kto_ext.data.loading import _BUILDERS

    path = os.path.expanduser(name)
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and suffix not in _BUILDERS:
        raise ValueError(
            f"unsupported file type {suffix or '(none)'!r} for {path}; convert it to {', '.join(_BUILDERS)}."
        )
    if _looks_local(name) and not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path}.")
    renames_wanted = {old: key.removesuffix("_column") for key, old in mapping.items()}

    def load(which: str):
        if os.path.isfile(path):
            stream = datasets.load_dataset(_BUILDERS[suffix], data_files=path, split=which, streaming=True)
        else:
            stream = datasets.load_dataset(path, name=dataset_config, split=which, streaming=True)
        present = stream.column_names or []
        renames = {old: new for old, new in renames_wanted.items() if old != new and old in present}
        stream = decode_labels(stream.rename_columns(renames) if renames else stream)  # a ClassLabel by its names
        if "label" in (stream.column_names or []):
            stream = stream.map(lambda row, i: {"label": normalize_label(row["label"], i)}, with_indices=True)
        return stream

    try:
        return PreparedData(load(split), load(test_split) if test_split else None, None)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(
            f"{err} (with dataset_streaming the eval split must exist: eval_fraction cannot split a stream)"
        ) from None


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id: starts with '/', '.' or '~', or has more than one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """`logger` silenced inside the block."""
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled
