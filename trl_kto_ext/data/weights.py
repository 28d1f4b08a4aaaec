"""Per-row weights: the optional `weight` column of a KTO dataset, checked, summed per class and carried to the loss.

A row of weight w contributes w * lambda_y * (1 - v) to the loss, which is divided by the sum of the weights of the
batch over all processes ([`kto_loss`]'s `weights` / `weight_total`). A dataset without the column weighs every
row 1.0 (the trainer then takes the plain mean, as before).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from trl_kto_ext.data.rows import more_rows, row_ref
from trl_kto_ext.errors import UserInputError

WEIGHT = "weight"


def weight_problem(value: Any) -> str | None:
    """Why `value` is not a usable weight (None when it is): not a number, NaN, infinite or negative."""
    if value is None:
        return "is missing (None)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"is {value!r} ({type(value).__name__}), not a number"
    if math.isnan(value):
        return "is NaN"
    if math.isinf(value):
        return f"is {value} (infinite)"
    if value < 0:
        return f"is {value}, negative"
    return None


def check_weights(values: list[Any], name: str, labels: list[Any] | None = None) -> None:
    """Raises ValueError naming the first row whose weight is missing, not a number, NaN, infinite or negative, and,
    with `labels` (training rows), when every row of a class weighs 0 (that class would never be learned from)."""
    bad = [(row, problem) for row, value in enumerate(values) if (problem := weight_problem(value)) is not None]
    if bad:
        row, problem = bad[0]
        raise UserInputError(
            f"The weight at {row_ref(row)} of the {name} dataset {problem}"
            f"{more_rows([r for r, _ in bad], 'have an unusable weight', '; ')}. Weights must be finite numbers >= 0 "
            "(0 leaves a row out of the loss): fix or drop that row, or remove the `weight` column to weigh every "
            "row 1.0."
        )
    if labels is None:
        return
    for flag, kind in ((True, "desirable"), (False, "undesirable")):
        rows = [row for row, label in enumerate(labels) if label is flag]
        if rows and not any(float(values[row]) > 0 for row in rows):
            raise ValueError(
                f"Every {kind} row of the {name} dataset has weight 0 (the first at {row_ref(rows[0])}): the loss would "
                f"never learn from the {kind} class and automatic loss aversion would divide by its weight mass 0. Give "
                f"some {kind} rows a positive weight, or drop the class's rows."
            )


def class_masses(weights: list[float], labels: list[bool]) -> tuple[float, float]:
    """(sum of the desirable rows' weights, sum of the undesirable rows'), summed with `math.fsum`."""
    desirable = math.fsum(float(w) for w, label in zip(weights, labels) if label)
    undesirable = math.fsum(float(w) for w, label in zip(weights, labels) if not label)
    return desirable, undesirable


def add_weights(batch: dict[str, Any], examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The collated `batch` with a float32 `weight` tensor [B] when the examples carry a weight (unchanged else);
    [`UserInputError`] for an unusable weight ([`weight_problem`])."""
    import torch

    if examples and WEIGHT in examples[0]:
        # Streamed rows past the first checked ones reach training unchecked: a NaN weight would surface as a NaN loss.
        bad = [
            (i, problem) for i, ex in enumerate(examples) if (problem := weight_problem(ex.get(WEIGHT))) is not None
        ]
        if bad:
            raise UserInputError(
                f"The weight of row {bad[0][0]} of a training batch (counting from 0) {bad[0][1]}: weights must be "
                "finite numbers >= 0 (0 leaves a row out of the loss). Fix or drop that row in the data, or remove the "
                "`weight` column to weigh every row 1.0."
            )
        batch[WEIGHT] = torch.tensor([float(ex[WEIGHT]) for ex in examples], dtype=torch.float32)
    return batch


def batch_weight_total(trainer, weights):
    """The denominator that makes the DDP-averaged gradient the gradient of the global weighted mean.

    Each process's loss is sum_local(w L) / (W / P), with W the sum of the weights over all P processes: DDP averages
    the P gradients, giving the gradient of sum_all(w L) / W. Returns None without weights (the plain mean) and the
    local sum on a single process. The sum over processes is a collective: every process calls this each step.
    """
    if weights is None:
        return None
    total = weights.detach().float().sum()
    processes = trainer.accelerator.num_processes
    if processes > 1:
        total = trainer.accelerator.reduce(total, reduction="sum") / processes
    return total
