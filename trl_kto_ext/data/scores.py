"""Scores to KTO labels: the one labelling rule shared by online KTO (rewards of sampled completions) and offline data
with a `score` column (a rating, a reward model's output) instead of `label`.

`label_mode="threshold"`: desirable iff score >= `desirable_threshold`; no row is left out.
`label_mode="relative"`: desirable iff score > the mean score of the completions of the same prompt; a score equal to
the mean (a tie) is undesirable; a prompt whose scores are all equal (one completion included) carries no preference
and its rows are left out.
With `score_weighting="distance"`, each row also weighs |score - threshold| (threshold mode) or |score - prompt's mean|
(relative mode), multiplied into an existing `weight` column.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from typing import Any

from trl_kto_ext.data.rows import more_rows, row_ref
from trl_kto_ext.errors import UserInputError

LABEL_MODES = ("threshold", "relative")
SCORE_WEIGHTINGS = ("none", "distance")
SCORE = "score"


def label_scores(
    scores: Sequence[float], groups: Sequence[Any] | None = None, mode: str = "threshold", threshold: float = 0.5
) -> list[bool | None]:
    """Desirable (True) / undesirable (False) labels from scores; None for a row left out (module docstring).

    Args:
        scores: one finite number per row.
        groups: the group (prompt) of each row, any hashable values; rows of a group need not be adjacent. Required
            by `"relative"`, ignored by `"threshold"`.
        mode: `"threshold"` or `"relative"`.
        threshold: the desirable threshold of `"threshold"` labels.

    Raises:
        ValueError: an unknown mode, or `"relative"` without `groups` of the same length as `scores`.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {mode!r}.")
    if mode == "threshold":
        return [float(s) >= threshold for s in scores]
    means = group_means(scores, groups)
    labels: list[bool | None] = []
    for score, group in zip(scores, groups):
        mean, all_equal = means[group]
        labels.append(None if all_equal else float(score) > mean)
    return labels


def group_means(scores: Sequence[float], groups: Sequence[Any] | None) -> dict[Any, tuple[float, bool]]:
    """{group: (mean score by `math.fsum`, whether all its scores are equal)}."""
    if groups is None or len(groups) != len(scores):
        raise ValueError("label_mode='relative' compares each score with the other scores of its prompt: give groups.")
    members: dict[Any, list[float]] = {}
    for score, group in zip(scores, groups):
        members.setdefault(group, []).append(float(score))
    return {g: (math.fsum(v) / len(v), max(v) == min(v)) for g, v in members.items()}


def score_distances(
    scores: Sequence[float], groups: Sequence[Any] | None = None, mode: str = "threshold", threshold: float = 0.5
) -> list[float]:
    """|score - threshold| (threshold mode) or |score - its prompt's mean score| (relative mode), per row."""
    if mode == "threshold":
        return [abs(float(s) - threshold) for s in scores]
    means = group_means(scores, groups)
    return [abs(float(s) - means[g][0]) for s, g in zip(scores, groups)]


def check_scores(values: list[Any], name: str, offset: int = 0) -> None:
    """ValueError naming the first row (counting from `offset`) whose score is missing, not a number, NaN or
    infinite."""
    bad = []
    for row, value in enumerate(values, offset):
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            bad.append(row)
    if bad:
        raise UserInputError(
            f"The score at {row_ref(bad[0])} of the {name} dataset is {values[bad[0] - offset]!r}"
            f"{more_rows(bad, 'have a score that is not a finite number', '; ')}: scores must be finite numbers. Fix or "
            "drop that row."
        )


def prompt_key(prompt: Any) -> str:
    """The group of a row in `"relative"` mode: its prompt (text, or the messages as canonical JSON)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def labels_from_scores(dataset, args, name: str = "train", report=None):
    """`dataset` with a boolean `label` from its `score` column when it has scores and no label (unchanged else).

    Rows left out (`"relative"` groups whose scores are all equal) are dropped; with `args.score_weighting ==
    "distance"` the `weight` column is set to (or multiplied by) the distance from the threshold. One line says how
    many rows became desirable, undesirable and left out. `args` gives `label_mode`, `desirable_threshold` and
    `score_weighting` (a `KTOExtConfig`). A streamed dataset is labelled lazily, in `"threshold"` mode only.

    Raises:
        ValueError: a score that is missing or not a finite number (naming the row), `"relative"` on a stream, or
            every row left out.
    """
    from datasets import Dataset, IterableDataset, Value

    report = report or _say
    if not isinstance(dataset, (Dataset, IterableDataset)):
        return dataset
    columns = dataset.column_names or list(next(iter(dataset), {}))
    if SCORE not in columns or "label" in columns or {"chosen", "rejected"} <= set(columns):
        if name == "train" and SCORE not in columns:  # (scores labelled already by the loader keep their column)
            _check_unused_score_settings(args)
        return dataset
    mode, threshold = args.label_mode, float(args.desirable_threshold)
    weighting = getattr(args, "score_weighting", "none")
    rule = f"label_mode={mode!r}" + (f", desirable_threshold={threshold:g}" if mode == "threshold" else "")
    if isinstance(dataset, IterableDataset):
        if mode != "threshold":
            raise ValueError(
                f"label_mode='relative' needs every score of a prompt, which a streamed {name} dataset cannot give: "
                "use label_mode='threshold', or load the dataset without streaming."
            )

        def label_row(row, index):
            check_scores([row[SCORE]], name, offset=index)
            out = {"label": float(row[SCORE]) >= threshold}
            if weighting == "distance":
                out["weight"] = abs(float(row[SCORE]) - threshold) * float(row.get("weight", 1.0))
            return out

        report(f"{name} dataset: labels from the `score` column ({rule}), row by row as the stream is read.")
        return dataset.map(label_row, with_indices=True)
    plain = dataset.with_format(None)
    scores = list(plain[SCORE])
    check_scores(scores, name)
    groups = [prompt_key(p) for p in plain["prompt"]] if mode == "relative" else None
    labels = label_scores(scores, groups, mode, threshold)
    kept = [row for row, label in enumerate(labels) if label is not None]
    n_desirable = sum(1 for label in labels if label is True)
    low, high = min(map(float, scores)), max(map(float, scores))
    if mode == "threshold" and len(scores) > 1 and low < high and not low < threshold <= high:
        side = "at or above" if threshold <= low else "below"
        raise ValueError(
            f"Every score of the {name} dataset (from {low:g} to {high:g}) is {side} desirable_threshold={threshold:g}, "
            f"so every row would be {'desirable' if threshold <= low else 'undesirable'}: set desirable_threshold "
            "inside the scores' range (--desirable_threshold), or use label_mode='relative' (better than the other "
            "completions of the same prompt)."
        )
    n_left_out = len(labels) - len(kept)
    if not kept:
        raise ValueError(
            f"Every row of the {name} dataset was left out by label_mode='relative': each prompt's completions all have "
            "the same score, so none is better than another. Use label_mode='threshold', or give prompts completions "
            "with different scores."
        )
    order = dataset.column_names
    dataset = dataset.add_column("label", labels, feature=Value("bool"))
    weighted = ""
    if weighting == "distance":
        distances = score_distances(scores, groups, mode, threshold)
        old = list(plain["weight"]) if "weight" in order else [1.0] * len(scores)
        new = [d * float(w) for d, w in zip(distances, old)]
        dataset = (dataset.remove_columns("weight") if "weight" in order else dataset).add_column("weight", new)
        weighted = ", each row weighted by its distance from the " + ("threshold" if mode == "threshold" else "mean")
    added = [c for c in ("label", "weight") if c not in order and c in dataset.column_names]
    dataset = dataset.select_columns([*order, *added])
    if n_left_out:
        dataset = dataset.select(kept)
    why = " (prompts whose completions all have the same score)" if mode == "relative" else ""
    report(
        f"{name} dataset: labels from the `score` column ({rule}): {n_desirable} desirable, "
        f"{len(kept) - n_desirable} undesirable, {n_left_out} left out{why}{weighted}."
    )
    return dataset


def _check_unused_score_settings(args) -> None:
    """A score setting changed from its default on data without a `score` column would be silently ignored: refuse."""
    changed = [
        f"{field}={getattr(args, field)!r}"
        for field, default in (("label_mode", "threshold"), ("desirable_threshold", 0.5), ("score_weighting", "none"))
        if getattr(args, field, default) != default
    ]
    if changed and type(args).__name__ != "OnlineKTOConfig":  # online KTO labels its samples' rewards with them
        raise ValueError(
            f"{', '.join(changed)}: score settings, which turn a `score` column into labels, but the training data "
            "has no scores (it has labels, or pairs), so they would be ignored. Remove them, or give a score column "
            "(--score_column NAME) instead of labels."
        )


def _say(message: str) -> None:
    from accelerate import PartialState

    if not PartialState._shared_state or PartialState().is_main_process:
        print(message, flush=True)
