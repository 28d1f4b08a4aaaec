"""Input checks of KTOExtTrainer: bad input is reported (row, problem and fix) before training starts.

Dataset checks run on the raw rows (columns, label types, empty or malformed text, chat template) and on the
tokenized rows (empty completions, token ids the model has no embedding for, rows dropped or truncated by
`max_length`). Run-time guards live in `guards.py`, and the pairing state across checkpoints in `resume.py`.
"""

from __future__ import annotations

import logging
import warnings
from itertools import islice
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset

from trl_kto_ext.data.labels import decode_labels
from trl_kto_ext.data.messages import check_rendered, structure_problem
from trl_kto_ext.data.rows import more_rows as _more_rows
from trl_kto_ext.data.rows import row_ref
from trl_kto_ext.data.weights import WEIGHT, check_weights
from trl_kto_ext.logprobs.humanline import check_setup as check_reference_sync

logger = logging.getLogger(__name__)

_STREAM_SAMPLE = 64  # rows of an IterableDataset checked (it cannot be scanned without consuming it)
_UNPAIRED = ("prompt", "completion", "label")
_LAYOUTS = "`prompt`, `completion`, `label` (unpaired) or `prompt`, `chosen`, `rejected` (paired)"
_LABEL_HINT = (
    "KTO labels must be booleans (True = desirable, False = undesirable). Fix or drop that row, or convert the column "
    "with `trl_kto_ext.data.loading.prepare_unpaired(dataset)`, which maps 0/1, 'good'/'bad', 'up'/'down', ... to booleans "
    "and names any value it cannot map."
)
_MESSAGES_HINT = (
    "Conversational rows must be lists of {'role': ..., 'content': ...} dicts, e.g. "
    "[{'role': 'user', 'content': 'What is 2+2?'}]; fix that row or give plain text instead."
)


# ------------------------------------------------------------------------------------------------ before set-up
def check_before_setup(model, args, trainer_kwargs: dict[str, Any]) -> int | None:
    """Checks run before TRL's set-up touches the data; returns the model's number of input embedding rows."""
    if trainer_kwargs.get("train_dataset") is not None:
        check_not_empty(trainer_kwargs["train_dataset"], "train")
    check_reference_sync(model, args, trainer_kwargs.get("peft_config"))  # humanline / sync_ref_model with LoRA
    ensure_pad_token(trainer_kwargs.get("processing_class"))
    return embedding_rows(model, args)


def fit_max_length(model, args) -> int | None:
    """Keeps `args.max_length` within the model's positions (`max_position_embeddings` of its text config).

    Left at its default and larger than the model's limit, it is lowered to the limit (one line says so); set by the
    user above the limit, ValueError: tokens past the last position would index out of the position table.
    Returns the limit (None when unknown), for `check_tokenized(position_limit=...)`.
    """
    limit = _position_limit(model, args)
    if limit is None or args.max_length is None or args.max_length <= limit:
        return limit
    default = type(args).__dataclass_fields__["max_length"].default
    if args.max_length != default:
        raise ValueError(
            f"max_length={args.max_length} is longer than the model supports: its max_position_embeddings is {limit}, "
            f"so tokens past position {limit} have no position embedding. Set max_length to {limit} or less."
        )
    if _main_process():
        print(f"max_length lowered from its default {default} to {limit}, the model's max_position_embeddings.")
    args.max_length = limit
    return limit


def _named_model_config(model: str, args):
    """The config of a model given by name or path; None when it cannot be read (a check must not fail where loading
    the model itself may still work)."""
    init_kwargs = getattr(args, "model_init_kwargs", None) or {}
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            model, revision=init_kwargs.get("revision"), trust_remote_code=getattr(args, "trust_remote_code", False)
        )
    except Exception:
        return None


def _position_limit(model, args) -> int | None:
    config = _named_model_config(model, args) if isinstance(model, str) else getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_not_empty(dataset, name: str) -> None:
    if isinstance(dataset, Dataset):
        empty = len(dataset) == 0
    elif isinstance(dataset, IterableDataset):
        empty = next(iter(dataset), None) is None
    else:
        return  # TRL reports other types
    if empty:
        raise ValueError(
            f"The {name} dataset has 0 rows: there is nothing to {'train' if name == 'train' else 'evaluate'} on. "
            "Check the file or split that was loaded and any filtering applied before creating the trainer."
        )


def ensure_pad_token(processing_class) -> None:
    """Pads with EOS when the tokenizer has no pad token (as TRL does), but says so."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None or getattr(tokenizer, "pad_token", "") is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            "The tokenizer has neither a pad token nor an EOS token, so batches cannot be padded. Set one before "
            "creating the trainer, e.g. `tokenizer.pad_token = tokenizer.unk_token` or "
            "`tokenizer.add_special_tokens({'pad_token': '<pad>'})` followed by "
            "`model.resize_token_embeddings(len(tokenizer))`."
        )
    tokenizer.pad_token = tokenizer.eos_token
    warnings.warn(
        f"The tokenizer has no pad token; padding with its EOS token {tokenizer.eos_token!r} "
        f"(id {tokenizer.eos_token_id}), as TRL does. This is safe here: padded positions are excluded by the "
        "attention and completion masks, so the EOS that ends each completion is still trained on. Set "
        "`tokenizer.pad_token` before creating the trainer to silence this warning.",
        UserWarning,
        stacklevel=3,
    )


def embedding_rows(model, args=None) -> int | None:
    """Number of rows of the model's input embedding (None when unknown).

    For a model given by name, the `vocab_size` of its config (best effort: None if the config cannot be read).
    """
    if isinstance(model, str):
        config = _named_model_config(model, args)
        rows = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
        return int(rows) if isinstance(rows, int) else None
    if model is None:
        return None
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embedding, "num_embeddings", None)  # also right for parameters partitioned by ZeRO-3
    return int(rows) if isinstance(rows, int) else None


# ----------------------------------------------------------------------------------------------- raw dataset
def check_dataset(dataset, processing_class, name: str) -> None:
    """Columns, labels and text of a dataset given to the trainer, before tokenization.

    A map-style Dataset is checked row by row; an IterableDataset on its first rows only. A `ClassLabel` label is
    read by its class names (ValueError when they are not recognised). With `processing_class=None` the checks that
    need the tokenizer (chat template, rendering) are skipped: the command line checks the rows so, as loaded, before
    holding out an eval split, so that a message names the row as numbered in the user's file.
    """
    if isinstance(dataset, (Dataset, IterableDataset)):
        dataset = decode_labels(dataset, name)
    if isinstance(dataset, Dataset):
        check_not_empty(dataset, name)
        columns = dataset.column_names
        plain = dataset.with_format(None)

        def values(column):
            return list(plain[column])
    elif isinstance(dataset, IterableDataset):
        sample = list(islice(dataset, _STREAM_SAMPLE))
        if not sample:
            check_not_empty(dataset, name)
        columns = list(sample[0])

        def values(column):
            return [row.get(column) for row in sample]
    else:
        return
    if {"image", "images"} & set(columns):
        return  # vision rows are processed by TRL's vision collator
    text_columns = _check_columns(columns, values, name)
    if "completion" in text_columns:
        check_labels(values("label"), name)
    if WEIGHT in columns:  # finite, >= 0; a training class that weighs 0 in all its rows is refused
        whole_train = name == "train" and "label" in columns and isinstance(dataset, Dataset)  # not a stream's sample
        check_weights(values(WEIGHT), name, values("label") if whole_train else None)
    if _check_text(text_columns, values, name) and processing_class is not None:
        check_chat_template(processing_class, name)
        extra = [c for c in ("prompt", "tools", "chat_template_kwargs") if c in columns and c not in text_columns]
        table = {c: values(c) for c in (*text_columns, *extra)}
        rows = [dict(zip(table, row)) for row in zip(*table.values())]
        check_rendered(processing_class, rows, text_columns, name)


def _check_columns(columns: list[str], values, name: str) -> list[str]:
    present = set(columns)
    paired = {"chosen", "rejected"} & present and not {"completion", "label"} & present
    if not paired:
        needed, text = list(_UNPAIRED), ["prompt", "completion"]
    else:
        implicit_prompt = "chosen" in present and isinstance(values("chosen")[0], list)  # TRL extracts it
        needed = ["chosen", "rejected"] + ([] if implicit_prompt else ["prompt"])
        text = [c for c in ("prompt", "chosen", "rejected") if c in needed]
    missing = [c for c in needed if c not in present]
    if missing:
        raise ValueError(
            f"The {name} dataset has no {', '.join(repr(c) for c in missing)} column (columns present: "
            f"{sorted(present)}). KTOExtTrainer needs {_LAYOUTS}. Rename your columns, e.g. "
            "`dataset = dataset.rename_column('output', 'completion')`, or load the data with "
            "`trl_kto_ext.data.loading.prepare_unpaired(dataset, prompt_column=..., completion_column=..., label_column=...)`."
        )
    return text


def check_labels(labels: list[Any], name: str) -> None:
    bad = [row for row, value in enumerate(labels) if not isinstance(value, bool)]
    if bad:
        value = labels[bad[0]]
        raise ValueError(
            f"{row_ref(bad[0]).capitalize()} has label {value!r} ({type(value).__name__}) in the {name} dataset"
            f"{_more_rows(bad, 'have a label that is not a boolean')}. {_LABEL_HINT}"
        )


def _check_text(columns: list[str], values, name: str) -> bool:
    """Checks every prompt/completion value; returns whether the rows are conversational."""
    kinds = {}
    for column in columns:
        column_values = values(column)
        problems = [(row, p) for row, v in enumerate(column_values) if (p := structure_problem(v)) is not None]
        if problems:
            row, (kind, description) = problems[0]
            keep = (
                f"any((m.get('content') or '').strip() for m in r['{column}'])"
                if isinstance(column_values[row], list)
                else f"(r['{column}'] or '').strip()"
            )
            fix = {
                "empty": "KTO would learn from a completion with no text (or one without a prompt). Fill in or drop "
                f"such rows, e.g. `dataset = dataset.filter(lambda r: {keep})`.",
                "type": "Give text (a string) or a list of {'role', 'content'} messages.",
                "messages": _MESSAGES_HINT,
            }[kind]
            rows = [r for r, _ in problems]
            raise ValueError(
                f"{column} at {row_ref(row)} of the {name} dataset {description}{_more_rows(rows, 'have this problem', '; ')}"
                f". {fix}"
            )
        kinds[column] = isinstance(column_values[0], list)
    if len(set(kinds.values())) > 1:
        conversational = [c for c, k in kinds.items() if k]
        text = [c for c, k in kinds.items() if not k]
        raise ValueError(
            f"In the {name} dataset, {conversational} hold lists of messages but {text} hold plain text (row 0, counting from 0). "
            "A row must be all text or all conversational: convert one side, e.g. wrap the text as "
            "[{'role': 'assistant', 'content': text}]."
        )
    return any(kinds.values())


def check_chat_template(processing_class, name: str) -> None:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if getattr(processing_class, "chat_template", None) is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The {name} dataset is conversational (lists of {{'role', 'content'}} messages) but the tokenizer has no "
            "chat template to render them. Use the tokenizer of an instruct/chat model, set "
            "`tokenizer.chat_template` (e.g. copied from the instruct version of your model), or convert the rows "
            "to plain text prompts and completions."
        )


# ----------------------------------------------------------------------------------------- tokenized dataset
def check_tokenized(
    dataset,
    max_length: int | None,
    name: str,
    vocab_rows: int | None = None,
    tokenizer=None,
    position_limit: int | None = None,
):
    """Checks the tokenized rows and drops those whose prompt alone fills `max_length`, logging what is dropped.

    TRL's truncation keeps the start of prompt + completion; a row whose prompt has `max_length` tokens or more would
    keep no completion token, so it is dropped (as TRL does). Rows that are only partly truncated are counted too.
    The advice names a `max_length` within `position_limit` (the model's `max_position_embeddings`, when known).
    Returns the dataset without the dropped rows.
    """
    if not isinstance(dataset, Dataset):  # an IterableDataset cannot be counted: filter lazily, as TRL does
        return dataset if max_length is None else dataset.filter(lambda ex: len(ex["prompt_ids"]) < max_length)
    arrow = dataset.with_format("arrow")
    prompt_ids, completion_ids = arrow["prompt_ids"].combine_chunks(), arrow["completion_ids"].combine_chunks()
    prompt_len = pc.fill_null(pc.list_value_length(prompt_ids), 0).to_numpy(zero_copy_only=False)
    completion_len = pc.fill_null(pc.list_value_length(completion_ids), 0).to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(completion_len == 0).tolist()
    if empty:
        raise ValueError(
            f"The completion at {row_ref(empty[0])} of the {name} dataset has no tokens after tokenization"
            f"{_more_rows(empty, 'have no completion token')}: there is nothing to learn from. Check that the text "
            "(or the chat template's rendering of the assistant message) is not empty, then fix or drop that row."
        )
    if vocab_rows is not None:
        _check_vocabulary(prompt_ids, completion_ids, vocab_rows, tokenizer, name)
    if max_length is None:
        return dataset
    dropped = prompt_len >= max_length
    truncated = ~dropped & (prompt_len + completion_len > max_length)
    n = len(dataset)
    whole = int((prompt_len + completion_len).max())  # keeps every row whole: one figure in every message
    if dropped.all():
        raise ValueError(
            f"All {n} rows of the {name} dataset were dropped: each prompt alone has max_length={max_length} tokens "
            f"or more (shortest prompt: {int(prompt_len.min())} tokens), so no completion token would remain. "
            + _length_advice(whole, max_length, position_limit, "the prompts")
        )
    if _main_process() and dropped.any():
        logger.warning(
            "%s dataset: dropped %d of %d rows whose prompt alone has max_length=%d tokens or more (nothing of the "
            "completion would remain after truncation)%s. %s",
            name,
            int(dropped.sum()),
            n,
            max_length,
            _more_rows(np.flatnonzero(dropped).tolist(), "dropped", always=True),
            _length_advice(whole, max_length, position_limit, "them"),
        )
    if _main_process() and truncated.any():
        logger.warning(
            "%s dataset: truncated %d of %d rows longer than max_length=%d tokens (prompt + completion): TRL's "
            "truncation keeps the start, so the end of their completion is not trained on%s. %s",
            name,
            int(truncated.sum()),
            n,
            max_length,
            _more_rows(np.flatnonzero(truncated).tolist(), "truncated", always=True),
            _length_advice(whole, max_length, position_limit, "them"),
        )
    return dataset.select(np.flatnonzero(~dropped)) if dropped.any() else dataset


def _length_advice(needed: int, max_length: int, position_limit: int | None, what: str) -> str:
    """How to keep rows of `needed` tokens whole: a larger `max_length` only when the model's positions allow it."""
    if position_limit is None or needed <= position_limit:
        return f"Raise `max_length` to {needed} to keep every row whole, or shorten {what}."
    return (
        f"Keeping every row whole needs {needed} tokens, longer than the model can take (max_position_embeddings "
        f"{position_limit}): shorten the rows, or use a model with a longer context"
        + (f" (max_length can go up to {position_limit})." if max_length < position_limit else ".")
    )


def _check_vocabulary(prompt_ids, completion_ids, vocab_rows: int, tokenizer, name: str) -> None:
    size = f"the tokenizer has {len(tokenizer)} tokens" if tokenizer is not None else "the tokenizer has more"
    fix = (
        "The tokenizer does not match the model: use the tokenizer saved with this model, or, if you added tokens, "
        "call `model.resize_token_embeddings(len(tokenizer))` before creating the trainer."
    )
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is not None and pad_id >= vocab_rows:
        raise ValueError(
            f"The pad token id {pad_id} is out of range for the model, whose input embedding has {vocab_rows} rows "
            f"(ids 0..{vocab_rows - 1}), while {size}. {fix}"
        )
    for column, ids in (("prompt", prompt_ids), ("completion", completion_ids)):
        flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
        if flat.size and flat.max() >= vocab_rows:
            first = int(np.flatnonzero(flat >= vocab_rows)[0])
            row = int(pc.list_parent_indices(ids).to_numpy(zero_copy_only=False)[first])
            raise ValueError(
                f"Token id {int(flat[first])} in the {column} of {row_ref(row)} of the {name} dataset is out of range for "
                f"the model, whose input embedding has {vocab_rows} rows (ids 0..{vocab_rows - 1}), while {size}. "
                f"{fix}"
            )


def _main_process() -> bool:
    from accelerate import PartialState

    return not PartialState._shared_state or PartialState().is_main_process


def check_sharding(args, fsdp_enabled: bool) -> None:
    """Raises a `ValueError` when `fsdp` is set but accelerate did not set FSDP up.

    accelerate selects FSDP only for GPU-type devices: on CPU (`use_cpu=True`, or no accelerator) the Trainer's
    `fsdp` arguments silently give plain data parallelism with every parameter replicated.
    """
    if getattr(args, "fsdp", None) and not fsdp_enabled:
        raise ValueError(
            f"fsdp={args.fsdp!r} is set, but accelerate did not enable FSDP on device {args.device.type!r} (it does "
            "so only on GPUs/accelerators): training would run as plain data parallelism with unsharded weights. "
            "Run on GPUs, or remove `fsdp` to train with plain data parallelism knowingly."
        )
