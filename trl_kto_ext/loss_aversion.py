"""Loss aversion: lambda_D / lambda_U from class counts (paper Eq. 8), or checked manual weights."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import NamedTuple

from datasets import Dataset, IterableDataset

from trl_kto_ext.config import LOSS_AVERSION_RANGE
from trl_kto_ext.data.labels import label_values
from trl_kto_ext.data.weights import WEIGHT, check_weights, class_masses


class LossAversion(NamedTuple):
    """Resolved weights and the counts they were derived from.

    Attributes:
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.
        n_desirable: n_D, desirable rows in the training set.
        n_undesirable: n_U, undesirable rows in the training set.
        mode: "auto" or "manual".
        counted_from: where n_D and n_U were counted when not the whole training set (e.g. "the first 1000 rows of
            the stream"); empty for the whole set.
        mass_desirable: W_D, the sum of the desirable rows' weights when the data has a `weight` column, else None.
        mass_undesirable: W_U, likewise for the undesirable rows. With weights, the class sizes in Eq. (8) are these
            weighted masses: a row of weight 2 counts as two rows.
    """

    desirable_weight: float
    undesirable_weight: float
    n_desirable: int
    n_undesirable: int
    mode: str
    counted_from: str = ""
    mass_desirable: float | None = None
    mass_undesirable: float | None = None

    @property
    def weighted(self) -> bool:
        return self.mass_desirable is not None

    @property
    def ratio(self) -> float:
        """lambda_D * n_D / (lambda_U * n_U), the quantity Eq. (8) of the paper bounds to [1, 4/3] (with weights:
        lambda_D * W_D / (lambda_U * W_U))."""
        if self.weighted:
            return (self.desirable_weight * self.mass_desirable) / (self.undesirable_weight * self.mass_undesirable)
        return (self.desirable_weight * self.n_desirable) / (self.undesirable_weight * self.n_undesirable)

    def describe(self) -> str:
        where = f", counted from {self.counted_from}" if self.counted_from else ""
        sizes = f"n_D={self.n_desirable}, n_U={self.n_undesirable}"
        ratio = "lambda_D*n_D/(lambda_U*n_U)"
        if self.weighted:
            sizes += f", weighted class mass W_D={self.mass_desirable:.6g}, W_U={self.mass_undesirable:.6g}"
            ratio = "lambda_D*W_D/(lambda_U*W_U)"
            where += ", from the weighted class mass" if self.mode == "auto" else ""
        return (
            f"KTO loss aversion ({self.mode}{where}): lambda_D={self.desirable_weight:.4g}, "
            f"lambda_U={self.undesirable_weight:.4g}, {sizes}, {ratio}={self.ratio:.4g} (paper advises [1, 4/3])"
        )


def resolve_loss_aversion(
    n_desirable: int,
    n_undesirable: int,
    mode: str = "auto",
    target: float = 1.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    masses: tuple[float, float] | None = None,
) -> LossAversion:
    """Return lambda_D / lambda_U for a training set with the given class counts.

    `auto` keeps lambda_U = 1 and sets lambda_D = target * n_U / n_D, so that the ratio equals `target`.
    `manual` keeps the given weights and warns once when the ratio falls outside [1, 4/3].
    With `masses` (W_D, W_U: the classes' summed row weights), W_D and W_U take the place of n_D and n_U.
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        missing = "desirable (label=True)" if n_desirable <= 0 else "undesirable (label=False)"
        raise ValueError(
            f"The training set has no {missing} rows (n_D={n_desirable}, n_U={n_undesirable}). KTO needs both "
            "labels: the loss compares desirable and undesirable completions against a shared reference point. "
            "Add rows of the missing class (or check the label column / its mapping)."
        )
    size_d, size_u = masses if masses is not None else (n_desirable, n_undesirable)
    if masses is not None and not (size_d > 0 and size_u > 0):
        empty = "desirable" if not size_d > 0 else "undesirable"
        raise ValueError(
            f"Every {empty} training row has weight 0 (weighted class mass W_D={size_d:g}, W_U={size_u:g}): KTO would "
            f"never learn from the {empty} class. Give some {empty} rows a positive weight."
        )
    extra = {"mass_desirable": size_d, "mass_undesirable": size_u} if masses is not None else {}
    if mode == "auto":
        return LossAversion(target * size_u / size_d, 1.0, n_desirable, n_undesirable, "auto", **extra)
    result = LossAversion(
        float(desirable_weight), float(undesirable_weight), n_desirable, n_undesirable, "manual", **extra
    )
    low, high = LOSS_AVERSION_RANGE
    if not (low - 1e-6 <= result.ratio <= high + 1e-6):
        suggested_low = low * undesirable_weight * size_u / size_d
        suggested_high = high * undesirable_weight * size_u / size_d
        warnings.warn(
            f"lambda_D*n_D/(lambda_U*n_U) = {result.ratio:.3g} is outside [1, 4/3] advised by the KTO paper (Eq. 8). "
            f"With these counts, desirable_weight in [{suggested_low:.3g}, {suggested_high:.3g}] would be in range; "
            "or use loss_aversion='auto'.",
            UserWarning,
            stacklevel=2,
        )
    return result


def weight_masses(dataset) -> tuple[float, float] | None:
    """(W_D, W_U): the summed `weight` of the desirable and of the undesirable rows of a map-style dataset; None
    without a `weight` column (every row weighs 1). Paired rows give both rows of a pair the pair's weight."""
    if isinstance(dataset, IterableDataset) or WEIGHT not in dataset.column_names:
        return None
    weights = list(dataset.with_format(None)[WEIGHT])
    if "label" in dataset.column_names:
        labels = label_values(dataset)
        check_weights(weights, "train", labels)  # also reached by vision rows, which TRL does not prepare
        return class_masses(weights, labels)
    check_weights(weights, "train")
    total = math.fsum(float(w) for w in weights)  # paired: each pair gives one row of each class
    return total, total


def count_raw_labels(dataset) -> tuple[int, int] | None:
    """(n_desirable, n_undesirable) of a training set in unpaired or paired form; None for an IterableDataset."""
    if isinstance(dataset, IterableDataset):
        return None
    columns = set(dataset.column_names)
    if "label" in columns:
        labels = label_values(dataset)  # a ClassLabel by its class names, never by its codes
        for row, value in enumerate(labels):
            if not isinstance(value, bool):
                raise ValueError(
                    f"Row {row} has label {value!r} ({type(value).__name__}); KTO labels must be booleans "
                    "(True = desirable, False = undesirable). Convert the column first, e.g. with "
                    "`trl_kto_ext.data.loading.prepare_unpaired(dataset)`, which accepts 0/1, 'good'/'bad', 'up'/'down', ..."
                )
        n_desirable = sum(labels)
        return n_desirable, len(labels) - n_desirable
    if {"chosen", "rejected"} <= columns:
        return len(dataset), len(dataset)
    raise ValueError(
        f"The training set has columns {sorted(columns)}; KTO needs `prompt`, `completion` and `label` (unpaired) or "
        "`prompt`, `chosen` and `rejected` (paired). Rename the columns, e.g. with `dataset.rename_column(...)`."
    )


# Columns a label count reads; the others (images, long texts) are not copied out of a stream.
_COUNTED_COLUMNS = ("prompt", "completion", "label", "chosen", "rejected", WEIGHT)


def count_stream_labels(dataset: IterableDataset, max_rows: int, with_masses: bool = False):
    """(n_desirable, n_undesirable, what was counted) from the first `max_rows` rows of a stream.

    The rows are read by a fresh iterator (`iter(dataset)`), so the iteration the trainer starts later is not
    consumed, and counted by [`count_raw_labels`]. The description reads "all 16 rows of the stream" when the stream
    ended within `max_rows`, else "the first 1000 rows of the stream".

    Raises:
        ValueError: the stream is empty, or its rows have no usable label / paired columns.
    """
    rows = list(itertools.islice(iter(dataset), max_rows + 1))
    complete = len(rows) <= max_rows
    rows = [{k: row[k] for k in _COUNTED_COLUMNS if k in row} for row in rows[:max_rows]]
    if not rows:
        raise ValueError("The streamed training set has no rows: give a stream with data.")
    features = dataset.features
    if features is not None:
        features = features.copy()
        for name in [name for name in features if name not in rows[0]]:
            del features[name]
    counted = Dataset.from_list(rows, features=features)
    counts = count_raw_labels(counted)
    what = f"all {len(rows)} rows of the stream" if complete else f"the first {len(rows)} rows of the stream"
    return (*counts, what, weight_masses(counted)) if with_masses else (*counts, what)


def loss_aversion_for(dataset, args) -> LossAversion:
    """lambda_D / lambda_U for a training set (map-style or streamed) and a config's loss-aversion fields.

    A stream (`IterableDataset`) is counted from its first `args.loss_aversion_stream_rows` rows
    ([`count_stream_labels`]); the result's `counted_from` says so.

    Raises:
        ValueError: a class is missing from what was counted (for a stream, with the ways out), or bad labels.
    """
    counted_from = ""
    if isinstance(dataset, IterableDataset):
        rows = getattr(args, "loss_aversion_stream_rows", 1000)
        *counts, counted_from, masses = count_stream_labels(dataset, rows, with_masses=True)
    else:
        counts, masses = count_raw_labels(dataset), weight_masses(dataset)
    try:
        result = resolve_loss_aversion(
            *counts,
            mode=getattr(args, "loss_aversion", "manual"),
            target=getattr(args, "loss_aversion_target", 1.0),
            desirable_weight=args.desirable_weight,
            undesirable_weight=args.undesirable_weight,
            masses=masses,
        )
    except ValueError as err:
        if not counted_from:
            raise
        raise ValueError(
            f"Counted from {counted_from}: {err} A stream ordered by label needs shuffling "
            "(`dataset.shuffle(buffer_size=...)`), a larger `loss_aversion_stream_rows`, or "
            "loss_aversion='manual' with desirable_weight/undesirable_weight."
        ) from None
    return result._replace(counted_from=counted_from)
