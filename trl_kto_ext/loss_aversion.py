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
        n_desirable: n_D, desirable rows in the training set (0 for a set of undesirable rows only).
        n_undesirable: n_U, undesirable rows in the training set (0 for a set of desirable rows only).
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
    def missing_class(self) -> str | None:
        """The class absent from the counts ("desirable" or "undesirable"), or None when both are present."""
        if self.n_desirable > 0 and self.n_undesirable > 0:
            return None
        return "desirable" if self.n_desirable <= 0 else "undesirable"

    @property
    def ratio(self) -> float:
        """lambda_D * n_D / (lambda_U * n_U), the quantity Eq. (8) of the paper bounds to [1, 4/3]; NaN when a class
        is missing (the ratio is then undefined, and it is neither logged nor checked)."""
        if self.missing_class is not None:
            return float("nan")
        if self.weighted:  # lambda_D * W_D / (lambda_U * W_U)
            return (self.desirable_weight * self.mass_desirable) / (self.undesirable_weight * self.mass_undesirable)
        return (self.desirable_weight * self.n_desirable) / (self.undesirable_weight * self.n_undesirable)

    def describe(self) -> str:
        """The one line printed when training starts: the weights, the counts and what they mean."""
        counted = f", counted from {self.counted_from}" if self.counted_from else ""
        ratio = "lambda_D*n_D/(lambda_U*n_U)"
        sizes = f"n_D={self.n_desirable}, n_U={self.n_undesirable}"
        if self.weighted:
            ratio = "lambda_D*W_D/(lambda_U*W_U)"
            sizes += f", weighted class mass W_D={self.mass_desirable:.6g}, W_U={self.mass_undesirable:.6g}"
            counted += ", from the weighted class mass" if self.mode == "auto" and self.missing_class is None else ""
        head = (
            f"KTO loss aversion ({self.mode}{counted}): lambda_D={self.desirable_weight:.4g}, "
            f"lambda_U={self.undesirable_weight:.4g}, {sizes}"
        )
        if self.missing_class is None:
            return f"{head}, {ratio}={self.ratio:.4g} (paper advises [1, 4/3])"
        return f"{head}: {one_class_meaning(self)}"


def one_class_meaning(aversion: LossAversion) -> str:
    """What lambda means when the counted rows hold one class: the text after the counts in the printed line."""
    if aversion.missing_class == "desirable":
        present, used, unused, value = "undesirable", "lambda_U", "lambda_D", aversion.undesirable_weight
    else:
        present, used, unused, value = "desirable", "lambda_D", "lambda_U", aversion.desirable_weight
    if aversion.mode == "auto":
        source = "auto has no class to balance and falls back to lambda_D = lambda_U = 1"
    else:
        source = "the manual weights are kept"
    text = (
        f"only {present} rows, so each row is compared with z0 alone and lambda_D*n_D/(lambda_U*n_U) is undefined; "
        f"{source}: {used}={value:.4g} only scales the loss and {unused} is unused."
    )
    if aversion.mode == "auto" and aversion.counted_from.startswith(
        "the first "
    ):  # a look-ahead, not the whole stream
        text += (
            f" If {aversion.missing_class} rows come later in the stream, shuffle it "
            "(`dataset.shuffle(buffer_size=...)`) or raise loss_aversion_stream_rows so that auto counts both "
            "classes, or set loss_aversion='manual' with desirable_weight/undesirable_weight."
        )
    return text


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

    One class only (n_D = 0 or n_U = 0): the KTO loss is still defined, each row being compared with the reference
    point z0 alone, but there is no ratio to balance. `auto` then falls back to lambda_D = lambda_U = 1 (TRL's
    defaults; the present class's weight only scales the loss) and `manual` keeps the given weights, without the
    range warning. [`LossAversion.describe`] says so in one line. (Online KTO's rolling window, which sees one-class
    steps, keeps its previous weights instead: `trl_kto_ext.online.rolling_loss_aversion`.)

    Raises:
        ValueError: no rows at all (n_D = n_U = 0), or a class with rows whose weights are all 0.
    """
    if n_desirable <= 0 and n_undesirable <= 0:
        raise ValueError(
            f"The training set has no rows to count (n_D={n_desirable}, n_U={n_undesirable}): give a training set "
            "with labelled rows."
        )
    extra = {"mass_desirable": masses[0], "mass_undesirable": masses[1]} if masses is not None else {}
    if n_desirable <= 0 or n_undesirable <= 0:
        weights = (1.0, 1.0) if mode == "auto" else (float(desirable_weight), float(undesirable_weight))
        return LossAversion(*weights, n_desirable, n_undesirable, mode, **extra)
    size_d, size_u = masses if masses is not None else (n_desirable, n_undesirable)
    if not (size_d > 0 and size_u > 0):
        empty = "desirable" if not size_d > 0 else "undesirable"
        raise ValueError(
            f"Every {empty} training row has weight 0 (weighted class mass W_D={size_d:g}, W_U={size_u:g}): KTO would "
            f"never learn from the {empty} class. Give some {empty} rows a positive weight."
        )
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

    With `with_masses`, the counted rows' weighted class masses ([`weight_masses`], None without weights) follow.
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
        ValueError: bad labels or columns, or no rows. One class only is not an error (see [`resolve_loss_aversion`]).
    """
    counted_from = ""
    if isinstance(dataset, IterableDataset):
        rows = getattr(args, "loss_aversion_stream_rows", 1000)
        *counts, counted_from, masses = count_stream_labels(dataset, rows, with_masses=True)
    else:
        counts, masses = count_raw_labels(dataset), weight_masses(dataset)
    result = resolve_loss_aversion(
        *counts,
        mode=getattr(args, "loss_aversion", "manual"),
        target=getattr(args, "loss_aversion_target", 1.0),
        desirable_weight=args.desirable_weight,
        undesirable_weight=args.undesirable_weight,
        masses=masses,
    )
    return result._replace(counted_from=counted_from)
