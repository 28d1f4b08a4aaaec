"""Load, validate and reshape unpaired KTO data (prompt, completion, bool label) from files, folders or the Hub."""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Value

from trl_kto_ext.data.hub import check_hub_reachable
from trl_kto_ext.data.labels import decode_labels, label_values
from trl_kto_ext.data.labels import normalize_label as normalize_label  # re-exported: part of this module's public API
from trl_kto_ext.data.messages import has_payload
from trl_kto_ext.data.rows import row_ref
from trl_kto_ext.data.unpairing import _check_dataset, _extract_prompt, _plain, is_paired, unpair_paired_dataset
from trl_kto_ext.data.weights import check_weights

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_FORMATS = ", ".join(_BUILDERS)
# Suffixes that mean "a file the user meant to read" even though we cannot: they must not fall through to the Hub.
_OTHER_FILE_SUFFIXES = {".txt", ".tsv", ".arrow", ".gz", ".zip", ".xlsx", ".pkl", ".yaml", ".yml"}


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}; use 1.0 to keep every row of that class.")


def count_labels(dataset: Dataset) -> tuple[int, int]:
    """Return (n_desirable, n_undesirable), checking that every `label` is a bool (a `ClassLabel` is read by name)."""
    dataset = _check_dataset(dataset)
    if "label" not in dataset.column_names:
        raise ValueError(f"No 'label' column (columns: {dataset.column_names}); run prepare_unpaired() first.")
    n_true = 0
    for row, value in enumerate(label_values(dataset)):
        if not isinstance(value, bool):
            raise ValueError(
                f"label at {row_ref(row)} is {value!r}, not a bool; run prepare_unpaired() to convert labels."
            )
        n_true += value
    return n_true, len(dataset) - n_true


def _is_blank(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):  # conversational: blank only if no message carries content, tool calls, ...
        return not any(has_payload(m) if isinstance(m, dict) else not _is_blank(m) for m in value)
    return value is None


def _check_text_columns(dataset: Dataset, columns: list[str]) -> None:
    plain = _plain(dataset)
    for column in columns:
        for row, value in enumerate(plain[column]):
            if not isinstance(value, (str, list)):
                raise ValueError(
                    f"{column} at {row_ref(row)} is {value!r}, not text or a list of messages; fix that row."
                )
            if _is_blank(value):
                raise ValueError(f"{column} at {row_ref(row)} is empty ({value!r}); fill in or drop that row.")


def subsample_class(
    dataset: Dataset, desirable_fraction: float = 1.0, undesirable_fraction: float = 1.0, seed: int = 0
) -> Dataset:
    """Keep a seeded random `fraction` of each class (row order preserved), for the KTO paper's imbalance ablations.

    The kept count is `floor(fraction * n + 0.5)` (round half up) per class; a fraction that rounds a class present in
    the data down to 0 rows is an error (a class absent from the data stays absent).
    """
    _check_fraction("desirable_fraction", desirable_fraction)
    _check_fraction("undesirable_fraction", undesirable_fraction)
    count_labels(dataset)  # validates the label column
    labels = np.asarray(label_values(dataset), dtype=bool)  # a ClassLabel by its names
    rng = np.random.default_rng(seed)
    keep = []
    for flag, fraction in ((True, desirable_fraction), (False, undesirable_fraction)):
        name = "desirable" if flag else "undesirable"
        idx = np.flatnonzero(labels == flag)
        k = math.floor(fraction * len(idx) + 0.5)
        if k == 0 and len(idx) > 0:  # a fraction asks for some of the class; rounding to none is not what was meant
            raise ValueError(
                f"{name}_fraction={fraction} keeps 0 of the {len(idx)} {name} rows ({fraction} x {len(idx)} rounds "
                f"to 0): raise {name}_fraction to keep some, or leave the {name} rows out of the data to train on one "
                "class."
            )
        keep.append(idx if k == len(idx) else rng.choice(idx, size=k, replace=False))
    return dataset.select(np.sort(np.concatenate(keep)))


def _rename(dataset: Dataset, mapping: dict[str, str]) -> tuple[Dataset, dict[str, str]]:
    cols = dataset.column_names
    renames, wanted = {}, {}
    for target, source in mapping.items():
        if source == target:
            continue
        wanted[target] = source
        if target in cols:  # silently using the default-named column instead would train on the wrong data
            if source in cols:
                raise ValueError(
                    f"The data has both column {source!r} ({target}_column) and column {target!r}: it is unclear which "
                    f"one holds the {target}. Remove or rename the column you do not mean, or pass "
                    f"{target}_column={target!r} to use {target!r}."
                )
            raise ValueError(
                f"Column {source!r} ({target}_column) is not in the data; the data has {target!r}: pass "
                f"{target}_column={target!r} (the default) or rename the column."
            )
        if source in cols:
            renames[source] = target
    return (dataset.rename_columns(renames) if renames else dataset), wanted


def prepare_unpaired(
    dataset: Dataset,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    label_column: str = "label",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    weight_column: str = "weight",
    score_column: str = "score",
    desirable_fraction: float = 1.0,
    undesirable_fraction: float = 1.0,
    seed: int = 0,
    scores: Any = None,
    name: str = "train",
) -> Dataset:
    """Map columns to prompt/completion/label, unpair paired data, normalise labels, validate, and subsample classes.

    Accepts unpaired rows (prompt, completion, label) or paired rows (prompt, chosen, rejected; a conversational pair
    with the prompt inside chosen/rejected is split by TRL's `maybe_extract_prompt`). Extra columns are kept; an
    optional `weight` column (per row, or per pair: both rows get it) is checked. Rows with a `score` column and no
    label are labelled by `trl_kto_ext.data.scores.labels_from_scores` with the `label_mode`, `desirable_threshold`
    and `score_weighting` of `scores` (a `KTOExtConfig`; None: its defaults). `name` names the split in messages.
    """
    dataset = _check_dataset(dataset)
    _check_fraction("desirable_fraction", desirable_fraction)
    _check_fraction("undesirable_fraction", undesirable_fraction)
    names = ("prompt", "completion", "label", "chosen", "rejected", "weight", "score")
    columns = (prompt_column, completion_column, label_column, chosen_column, rejected_column, weight_column)
    mapping = dict(zip(names, (*columns, score_column)))
    dataset, wanted = _rename(dataset, mapping)
    for optional in ("weight", "score"):  # optional columns, but one named explicitly must exist
        if optional in wanted and optional not in dataset.column_names:
            raise ValueError(
                f"Column {wanted[optional]!r} ({optional}_column) is not in the data (columns: "
                f"{sorted(dataset.column_names)}). Pass the name of the column holding the {optional}s."
            )
    cols = set(dataset.column_names)
    if len(dataset) == 0:
        raise ValueError(f"The dataset has 0 rows (columns: {dataset.column_names}); load a file/split with data.")
    if "score" in cols and "label" not in cols and not is_paired(cols):
        from trl_kto_ext.data.scores import labels_from_scores

        dataset = labels_from_scores(dataset, scores or _default_score_args(), name)
        cols = set(dataset.column_names)

    paired = is_paired(cols)
    if paired:
        dataset = _extract_prompt(dataset)
        cols = set(dataset.column_names)
    needed = ["prompt", "chosen", "rejected"] if paired else ["prompt", "completion", "label"]
    missing = [c for c in needed if c not in cols]
    if missing:
        looked = ", ".join(f"{c} (looked for column {wanted[c]!r})" if c in wanted else c for c in missing)
        hint = " or ".join(f"{c}_column=<your column>" for c in missing)
        raise ValueError(
            f"Missing column(s): {looked}. Columns present: {sorted(cols)}. Map yours by passing {hint}. Accepted "
            "layouts: unpaired (prompt, completion, label) or paired (prompt, chosen, rejected)."
        )

    _check_text_columns(dataset, needed[:2] if not paired else needed)
    if "weight" in cols:
        check_weights(list(_plain(dataset)["weight"]), name)
    if paired:
        dataset = unpair_paired_dataset(dataset, seed=seed)
    else:
        dataset = decode_labels(dataset)  # by meaning: a ClassLabel by its names (never its codes), text markers, 0/1

    if desirable_fraction < 1 or undesirable_fraction < 1:
        dataset = subsample_class(dataset, desirable_fraction, undesirable_fraction, seed=seed)
    n_des, n_und = count_labels(dataset)
    if n_des == 0 or n_und == 0:
        # KTO trains on one class (each row against z0); a label column read wrongly gives one class too.
        logger.warning(
            "Only one label present (%d desirable, %d undesirable): KTO trains on it, each row compared with z0 alone "
            "(auto loss aversion then uses lambda_D = lambda_U = 1); check the label column if you expected both.",
            n_des,
            n_und,
        )
    return dataset


def _default_score_args():
    """The score-labelling settings of a default `KTOExtConfig` (threshold 0.5, no distance weighting)."""
    from types import SimpleNamespace

    return SimpleNamespace(label_mode="threshold", desirable_threshold=0.5, score_weighting="none")


def _json_error(path: Path) -> str | None:
    """Locate the first bad line of a JSON / JSON Lines file (pyarrow's message has no line number)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as err:
        if path.suffix == ".json" and not (err.msg == "Extra data" and "\n" in text[: err.pos]):
            return f"line {err.lineno}, column {err.colno}: {err.msg}"
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {lineno}: {err.msg} (column {err.colno})"
    return None


def _parse_error(path: Path, err: BaseException) -> ValueError:
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    detail = f"{type(root).__name__}: {str(root).strip()}"
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for file in files:
        if file.is_file() and file.suffix in (".json", ".jsonl") and (where := _json_error(file)):
            return ValueError(f"Malformed JSON in {file} at {where}. Fix that line and reload.")
    return ValueError(f"Could not parse {path} ({detail}). Fix the file and reload.")


def _load(builder: str | Path, source: str, split: str, **kwargs: Any) -> Dataset:
    try:
        return datasets.load_dataset(str(builder), split=split, **kwargs)
    except ValueError as err:
        if "Unknown split" in str(err):
            raise ValueError(f"Split {split!r} not found in {source!r}: {err} Pass split=<one of them>.") from None
        raise


def load_unpaired_dataset(
    dataset_name: str,
    *,
    split: str = "train",
    dataset_config: str | None = None,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    label_column: str = "label",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    weight_column: str = "weight",
    score_column: str = "score",
    desirable_fraction: float = 1.0,
    undesirable_fraction: float = 1.0,
    seed: int = 0,
    scores: Any = None,
) -> Dataset:
    """Load `dataset_name` with [`load_raw_dataset`] and return it through [`prepare_unpaired`]."""
    # Every keyword after dataset_config is passed on unchanged; collect them before any other local exists.
    options = {k: v for k, v in locals().items() if k not in ("dataset_name", "split", "dataset_config")}
    options["name"] = split
    text_columns = [prompt_column, completion_column, chosen_column, rejected_column]
    dataset = load_raw_dataset(dataset_name, split=split, dataset_config=dataset_config, text_columns=text_columns)
    return prepare_unpaired(dataset, **options)


def load_raw_dataset(
    dataset_name: str, *, split: str = "train", dataset_config: str | None = None, text_columns: list[str] = ()
) -> Dataset:
    """One split of `dataset_name`, its `text_columns` read as text (a CSV `27` stays "27", a JSON `007` too).

    `dataset_name` is a local .jsonl/.json/.csv/.parquet file, a folder of such files, a folder written by
    `save_to_disk`, or else a Hub id. A missing path is reported as such when it has a file suffix, starts with
    '/', '.', '~', or has more than one '/'; a plain "org/name" that does not exist locally is treated as a Hub id,
    and an unreachable Hub fails at once in one line. Raises `FileNotFoundError` or `ValueError` with the fix.
    """
    text_columns = list(text_columns)
    converters = dict.fromkeys(text_columns, str)  # CSV cells of text columns as written ("007", "2.50")
    path = Path(dataset_name).expanduser()
    suffix = path.suffix.lower()
    looks_local = suffix in _BUILDERS or suffix in _OTHER_FILE_SUFFIXES or dataset_name.startswith(("/", ".", "~"))
    looks_local |= dataset_name.count("/") > 1 or (os.sep != "/" and os.sep in dataset_name)
    try:
        if path.is_file():
            if suffix not in _BUILDERS:
                raise ValueError(f"Unsupported file type {suffix or '(none)'!r} for {path}; convert it to {_FORMATS}.")
            # CSV cells are text: read the text columns as written ("27", "007"), not as inferred numbers.
            csv = {"converters": converters} if suffix == ".csv" else {}
            dataset = _load(_BUILDERS[suffix], dataset_name, split, data_files=str(path), **csv)
            if suffix in (".json", ".jsonl"):
                dataset = _json_text(dataset, path, text_columns)
        elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, DatasetDict):
                if split not in loaded:
                    raise ValueError(f"Split {split!r} not in {path}; pass split= one of {sorted(loaded)}.")
                loaded = loaded[split]
            elif split != "train":
                raise ValueError(f"{path} holds a single Dataset without splits; pass split='train' (got {split!r}).")
            dataset = loaded
        elif path.is_dir():
            files = [f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")]
            all_csv = files and all(f.suffix.lower() == ".csv" for f in files)
            dataset = _load(path, dataset_name, split, **({"converters": converters} if all_csv else {}))
        elif looks_local:
            raise FileNotFoundError(f"No such file or folder: {path}. Give a {_FORMATS} file or a dataset folder.")
        else:
            check_hub_reachable(dataset_name)
            dataset = _load(dataset_name, dataset_name, split, name=dataset_config)
    except datasets.exceptions.DatasetGenerationError as err:
        raise _parse_error(path, err) from None
    except (datasets.exceptions.DatasetNotFoundError, ConnectionError) as err:
        if datasets.config.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"{dataset_name!r} is not a local path, and with HF_HUB_OFFLINE=1 only the local Hub cache is read: it "
                f"is not there. Pass a local {_FORMATS} file or a dataset folder, or unset HF_HUB_OFFLINE on a machine "
                "with network access."
            ) from None
        raise FileNotFoundError(
            f"{dataset_name!r} is not a local path and could not be loaded from the Hub ({err}). Check the spelling, "
            "your network / HF_TOKEN, or pass a local .jsonl/.json/.csv/.parquet file."
        ) from None
    return _as_text(dataset, text_columns)


def _json_text(dataset: Dataset, path: Path, columns: list[str]) -> Dataset:
    """Text columns that JSON typed as numbers (27 -> 27.0 next to a 2.5) or mixed (Json), re-read as written."""
    bad = [c for c in dict.fromkeys(columns) if c in dataset.features and _not_text(dataset.features[c])]
    if not bad:
        return dataset
    text = path.read_text(encoding="utf-8")
    rows = (
        json.loads(text)
        if path.suffix == ".json"
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    if not isinstance(rows, list) or len(rows) != len(dataset) or not all(isinstance(r, dict) for r in rows):
        return dataset  # another JSON layout: cast what was loaded instead
    for column in bad:
        values = [_as_str(row.get(column)) for row in rows]
        order = dataset.column_names
        dataset = dataset.remove_columns(column).add_column(column, values).select_columns(order)
    return dataset


def _not_text(feature) -> bool:
    return not isinstance(feature, (Value, list, datasets.List)) or (
        isinstance(feature, Value) and feature.dtype not in ("string", "large_string", "null")
    )


def _as_str(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _as_text(dataset: Dataset, columns: list[str]) -> Dataset:
    """Number or bool columns among the text columns cast to strings (a JSON `27` or a CSV folder's inferred ints)."""
    for column in dict.fromkeys(columns):
        feature = dataset.features.get(column)
        if isinstance(feature, Value) and feature.dtype not in ("string", "large_string", "null"):
            dataset = dataset.cast_column(column, Value("string"))
    return dataset
