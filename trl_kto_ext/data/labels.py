"""Read KTO labels by their meaning: text markers, 0/1, bools and `ClassLabel` codes through one table."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, IterableDataset, Value

from trl_kto_ext.data.rows import more_rows, row_ref
from trl_kto_ext.errors import UserInputError

_TRUE = "true 1 desirable good up thumbs_up 👍 yes positive chosen".split()
_FALSE = "false 0 undesirable bad down thumbs_down 👎 no negative rejected".split()
_LABELS = {**dict.fromkeys(_TRUE, True), **dict.fromkeys(_FALSE, False)}
ACCEPTED = "bools, 0/1 (int or float) or, case-insensitive, " + ", ".join(
    f"{t!r}/{f!r}" for t, f in zip(_TRUE, _FALSE)
)


def text_label(value: str) -> bool | None:
    """The meaning of a text marker ('good', 'Thumbs-Up', ' 👍️ ', ...): True, False, or None when not recognised."""
    # Normalise spelling variants ("Thumbs-Up", " 👍️ ") instead of listing them all.
    key = value.strip().lower().replace("\ufe0f", "").replace("-", "_").replace(" ", "_")
    return _LABELS.get(key)


def normalize_label(value: Any, row: int) -> bool:
    """Map a desirable/undesirable marker (bool, 0/1, 'good'/'bad', '👍'/'👎', ...) to a bool; ValueError otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Real) and value in (0, 1):  # ints, numpy ints, 0.0/1.0; NaN and 0.5 fall through
        return bool(value)
    if isinstance(value, str) and (meaning := text_label(value)) is not None:
        return meaning
    raise UserInputError(
        f"Unrecognised label {value!r} at {row_ref(row)}. Accepted labels: {ACCEPTED}. "
        "Fix the value in the data, or map it to one of these before loading."
    )


def class_label_meanings(feature: ClassLabel, column: str = "label") -> list[bool]:
    """The meaning of each code of a `ClassLabel` (index = code), read from its names; ValueError naming the names.

    The codes themselves mean nothing: `class_encode_column` sorts the names, so 'desirable' gets code 0.
    """
    meanings = [text_label(str(name)) for name in feature.names]
    unknown = [name for name, meaning in zip(feature.names, meanings) if meaning is None]
    if unknown or len(set(meanings)) != len(meanings):
        problem = f"{unknown} are not recognised" if unknown else "two names mean the same label"
        suggested = ["undesirable" if i == 0 else "desirable" for i in range(len(feature.names))]
        raise ValueError(
            f"The {column!r} column is a ClassLabel with names {feature.names}: {problem}, so which code is "
            f"desirable is unknown. Name the classes with markers this package reads (desirable/undesirable, "
            f"good/bad, chosen/rejected, true/false, ...), keeping their order, e.g. "
            f"`dataset = dataset.cast_column({column!r}, datasets.ClassLabel(names={suggested}))` if code 0 is the "
            "undesirable class, or convert the column to booleans yourself."
        )
    return meanings


def _class_label(dataset) -> ClassLabel | None:
    features = getattr(dataset, "features", None) or {}
    feature = features.get("label")
    return feature if isinstance(feature, ClassLabel) else None


def _decode(codes: list[Any], meanings: list[bool], offset: int = 0) -> list[bool]:
    out = []
    for row, code in enumerate(codes, offset):
        if not isinstance(code, numbers.Integral) or not 0 <= code < len(meanings):
            raise UserInputError(
                f"label at {row_ref(row)} is {code!r}, not a class of the ClassLabel; fix or drop that row."
            )
        out.append(meanings[code])
    return out


def decode_labels(dataset, name: str | None = None):
    """`dataset` with its `label` column read by meaning into booleans: a `ClassLabel` by its class names, text
    markers ('good'/'bad', '👍'/'👎', ...) and 0/1 by the table of [`normalize_label`]; a boolean column is unchanged.

    Works on a `Dataset` (decoded now, column order kept) and an `IterableDataset` (decoded lazily). ValueError naming
    the row (and `name`, the dataset's role: "train", "eval") and value of a label it cannot read, or the class names it does not recognise (`class_label_meanings`).
    """
    features = getattr(dataset, "features", None) or {}
    feature = features.get("label")
    if feature is None and isinstance(dataset, IterableDataset):
        return dataset.map(
            lambda batch, idx: {"label": _read(batch["label"], idx[0])}, batched=True, with_indices=True
        )
    if feature is None or (feature == Value("bool") and is_decoded(dataset)):
        return dataset
    if isinstance(feature, ClassLabel):
        meanings = class_label_meanings(feature)

        def read(codes, offset=0):
            return _decode(codes, meanings, offset)
    else:

        def read(values, offset=0):
            return _read(values, offset, name)

    features = features.copy()
    features["label"] = Value("bool")
    if isinstance(dataset, IterableDataset):
        return dataset.map(
            lambda batch, idx: {"label": read(batch["label"], idx[0])}, batched=True, with_indices=True,
            features=features,
        )  # fmt: skip
    labels = read(dataset.with_format(None)["label"])
    order = dataset.column_names  # add_column appends at the end; restore the user's column order
    dataset = dataset.remove_columns("label").add_column("label", labels, feature=Value("bool"))
    return dataset.select_columns(order)


def _read(values: list[Any], offset: int = 0, name: str | None = None) -> list[bool]:
    out, bad = [], []
    for row, value in enumerate(values, offset):
        try:
            out.append(normalize_label(value, row))
        except ValueError:
            bad.append(row)
    if bad:
        value = values[bad[0] - offset]
        raise UserInputError(
            f"Unrecognised label {value!r} at {row_ref(bad[0])}"
            f"{f' of the {name} dataset' if name else ''}{more_rows(bad, 'have a label it cannot read')}. "
            f"Accepted labels: {ACCEPTED}. Fix or drop that row, or map it to one of these before training."
        )
    return out


def label_values(dataset: Dataset) -> list[Any]:
    """The `label` values of a map-style dataset, `ClassLabel` codes read as their meaning (True/False)."""
    values = list(dataset.with_format(None)["label"])
    feature = _class_label(dataset)
    return _decode(values, class_label_meanings(feature)) if feature is not None else values


def is_decoded(dataset) -> bool:
    """Whether `label` is already a null-free boolean column (nothing to convert); a stream's cannot be known."""
    if not isinstance(dataset, Dataset):
        return isinstance(dataset, IterableDataset) and (dataset.features or {}).get("label") == Value("bool")
    return dataset.features["label"] == Value("bool") and not dataset.data.column("label").null_count


__all__ = ["ACCEPTED", "class_label_meanings", "decode_labels", "is_decoded", "label_values", "normalize_label"]
