"""Loss aversion: lambda_D / lambda_U from class counts (paper Eq. 8), or checked manual weights."""

from __future__ import annotations

import warnings
from typing import NamedTuple

from datasets import IterableDataset

from .config import LOSS_AVERSION_RANGE
from .labels import label_values


class LossAversion(NamedTuple):
    """Resolved weights and the counts they were derived from.

    Attributes:
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.
        n_desirable: n_D, desirable rows in the training set.
        n_undesirable: n_U, undesirable rows in the training set.
        mode: "auto" or "manual".
    """

    desirable_weight: float
    undesirable_weight: float
    n_desirable: int
    n_undesirable: int
    mode: str

    @property
    def ratio(self) -> float:
        """lambda_D * n_D / (lambda_U * n_U), the quantity Eq. (8) of the paper bounds to [1, 4/3]."""
        return (self.desirable_weight * self.n_desirable) / (self.undesirable_weight * self.n_undesirable)

    def describe(self) -> str:
        return (
            f"KTO loss aversion ({self.mode}): lambda_D={self.desirable_weight:.4g}, "
            f"lambda_U={self.undesirable_weight:.4g}, n_D={self.n_desirable}, n_U={self.n_undesirable}, "
            f"lambda_D*n_D/(lambda_U*n_U)={self.ratio:.4g} (paper advises [1, 4/3])"
        )


def resolve_loss_aversion(
    n_desirable: int,
    n_undesirable: int,
    mode: str = "auto",
    target: float = 1.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossAversion:
    """Return lambda_D / lambda_U for a training set with the given class counts.

    `auto` keeps lambda_U = 1 and sets lambda_D = target * n_U / n_D, so that the ratio equals `target`.
    `manual` keeps the given weights and warns once when the ratio falls outside [1, 4/3].
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        missing = "desirable (label=True)" if n_desirable <= 0 else "undesirable (label=False)"
        raise ValueError(
            f"The training set has no {missing} rows (n_D={n_desirable}, n_U={n_undesirable}). KTO needs both "
            "labels: the loss compares desirable and undesirable completions against a shared reference point. "
            "Add rows of the missing class (or check the label column / its mapping)."
        )
    if mode == "auto":
        return LossAversion(target * n_undesirable / n_desirable, 1.0, n_desirable, n_undesirable, "auto")
    result = LossAversion(float(desirable_weight), float(undesirable_weight), n_desirable, n_undesirable, "manual")
    low, high = LOSS_AVERSION_RANGE
    if not (low - 1e-6 <= result.ratio <= high + 1e-6):
        suggested_low = low * undesirable_weight * n_undesirable / n_desirable
        suggested_high = high * undesirable_weight * n_undesirable / n_desirable
        warnings.warn(
            f"lambda_D*n_D/(lambda_U*n_U) = {result.ratio:.3g} is outside [1, 4/3] advised by the KTO paper (Eq. 8). "
            f"With these counts, desirable_weight in [{suggested_low:.3g}, {suggested_high:.3g}] would be in range; "
            "or use loss_aversion='auto'.",
            UserWarning,
            stacklevel=2,
        )
    return result


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
                    "`trl_kto_ext.data.prepare_unpaired(dataset)`, which accepts 0/1, 'good'/'bad', 'up'/'down', ..."
                )
        n_desirable = sum(labels)
        return n_desirable, len(labels) - n_desirable
    if {"chosen", "rejected"} <= columns:
        return len(dataset), len(dataset)
    raise ValueError(
        f"The training set has columns {sorted(columns)}; KTO needs `prompt`, `completion` and `label` (unpaired) or "
        "`prompt`, `chosen` and `rejected` (paired). Rename the columns, e.g. with `dataset.rename_column(...)`."
    )
