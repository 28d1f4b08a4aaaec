"""Special tokens of tokenized rows (BOS, EOS, end of turn) right for every tokenizer shape, or a one-line error.

TRL tokenizes a plain-text row as `tokenizer(prompt)` and `tokenizer(prompt + completion + eos_token)` (its `add_eos`
adds the EOS text unless the completion already ends with it), and a conversational row through the chat template
(`apply_chat_template` adds no special tokens of its own). What the tokenizer adds to a text decides the rest:

- nothing (GPT-2, Qwen): `prompt` | `completion EOS`: right as TRL builds it;
- BOS (Llama, Mistral): `BOS prompt` | `completion EOS`: right, unless the prompt text already starts with the BOS
  text (a prompt rendered by hand with the template), which gives `BOS BOS prompt`: one BOS is dropped, said once;
- BOS ... EOS (`add_eos_token=True`, a `<s> $A </s>` post-processor): TRL's rows end `completion EOS EOS` (TRL 1.16,
  unslothai/unsloth#3228): the appended tokens after the completion's EOS are dropped, said once;
- no EOS token: TRL's `add_eos` fails on `None`; plain-text rows stop here naming the fix (conversational rows end
  with the chat template's end of turn and train as they are).

After the fix every plain-text completion ends with exactly one EOS id (a row that does not, e.g. an EOS text that
does not tokenize to the EOS id, stops the run naming the token), and a conversational completion without any special
token (a template that never ends the assistant turn) is said once.
"""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)
import logging
from typing import NamedTuple

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from trl import is_conversational

from trl_kto_ext.data.rows import more_rows, row_ref

logger = logging.getLogger(__name__)

_PROBE = "a"  # a text every tokenizer encodes to at least one token


class AddedTokens(NamedTuple):
    """Ids a tokenizer puts around a plain text when encoding it with special tokens (its post-processor)."""

    before: list[int]
    after: list[int]


def added_tokens(tokenizer) -> AddedTokens | None:
    """What `tokenizer(text)` adds around `tokenizer(text, add_special_tokens=False)`; None where the plain encoding
    is not found inside the other (a tokenizer whose special tokens change the text's own tokens)."""
    full = list(tokenizer(_PROBE)["input_ids"])
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start : start + len(plain)] == plain:
            return AddedTokens(full[:start], full[start + len(plain) :])
    return None


def is_conversational_dataset(dataset) -> bool:
    """Whether the rows are lists of messages, read from the first row as TRL decides it (False when empty)."""
    first = next(iter(dataset), None)
    return first is not None and is_conversational(first)


def check_can_end_completions(tokenizer, conversational: bool, name: str) -> None:
    """Raises a `ValueError` when plain-text completions cannot end with an EOS token: the tokenizer has none.
    Conversational rows end with the chat template's end of turn and need no EOS token."""
    if conversational or getattr(tokenizer, "eos_token", None) is not None:
        return
    raise ValueError(
        f"The tokenizer has no EOS token, so the plain-text completions of the {name} dataset cannot be ended: the "
        "model would never learn to stop. Set the token that ends a text for this model before creating the trainer "
        "(e.g. `tokenizer.eos_token = '</s>'`, the token whose id is `eos_token_id` in the model's generation "
        "config), or give conversational rows (lists of messages), which end with the chat template's end of turn."
    )


def fix_special_tokens(dataset, tokenizer, conversational: bool, name: str):
    """`dataset` (TRL-tokenized `prompt_ids` / `completion_ids`) with its special tokens put right (module docstring).

    Plain-text rows: the tokens a post-processor appends after the completion's EOS are dropped, and a doubled BOS at
    the start of a prompt loses one; each change is said once. Conversational rows are left as the chat template
    renders them (said once when their completions hold no special token at all).

    Raises:
        ValueError: a plain-text completion does not end with the EOS id after that (names the row and the token).
    """
    if conversational:
        _say_if_turns_never_end(dataset, tokenizer, name)
        return dataset
    added = added_tokens(tokenizer)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    appended = list(added.after) if added is not None else []
    prepends_bos = added is not None and bos is not None and added.before[-1:] == [bos]
    if not appended and not prepends_bos:
        _check_ends_with_eos(dataset, tokenizer, name)
        return dataset
    if isinstance(dataset, Dataset):
        counts = _count_fixes(dataset, eos, bos, appended, prepends_bos)
        if not any(counts):
            _check_ends_with_eos(dataset, tokenizer, name)
            return dataset
        _say_fixes(counts, len(dataset), tokenizer, appended, name)
    else:
        _say_fixes(None, None, tokenizer, appended, name)

    def fix(batch):
        prompts, completions = [], []
        for prompt, completion in zip(batch["prompt_ids"], batch["completion_ids"]):
            if appended and len(completion) > len(appended) and completion[-len(appended) :] == appended:
                if completion[-len(appended) - 1] == eos:  # the completion's own EOS, then the tokenizer's additions
                    completion = completion[: -len(appended)]
            if prepends_bos and prompt[:2] == [bos, bos]:
                prompt = prompt[1:]
            prompts.append(prompt)
            completions.append(completion)
        return {"prompt_ids": prompts, "completion_ids": completions}

    kwargs = {"desc": f"Special tokens of the {name} dataset"} if isinstance(dataset, Dataset) else {}
    dataset = dataset.map(fix, batched=True, **kwargs)
    _check_ends_with_eos(dataset, tokenizer, name)
    return dataset


def text_prompt_ids(tokenizer, prompt_ids: list[int]) -> list[int]:
    """A tokenized plain-text prompt (online sampling) as `fix_special_tokens` leaves a dataset's: without the tokens
    the tokenizer appends after a text (an EOS from `add_eos_token=True` would end the prompt before generation
    starts), and with one BOS where the prompt text already started with the BOS text."""
    ids = list(prompt_ids)
    added = added_tokens(tokenizer)
    if added is None:
        return ids
    after, bos = list(added.after), tokenizer.bos_token_id
    if after and len(ids) > len(after) and ids[-len(after) :] == after:
        ids = ids[: -len(after)]
    if bos is not None and added.before[-1:] == [bos] and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


# ------------------------------------------------------------------------------------------------------ helpers
def _lists(dataset: Dataset, column: str):
    values = dataset.with_format("arrow")[column].combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(values).to_numpy(zero_copy_only=False)
    return flat, lengths, np.concatenate([[0], np.cumsum(lengths)])


def _count_fixes(dataset: Dataset, eos, bos, appended: list[int], prepends_bos: bool) -> tuple[int, int]:
    """(rows whose completion ends with EOS + the appended tokens, rows whose prompt starts with two BOS)."""
    n_appended = n_bos = 0
    if appended:
        flat, lengths, offsets = _lists(dataset, "completion_ids")
        k = len(appended)
        rows = np.flatnonzero(lengths > k)
        ends = offsets[rows + 1]
        match = np.ones(len(rows), dtype=bool)
        for j, token in enumerate([eos, *appended]):
            match &= flat[ends - (k + 1) + j] == token
        n_appended = int(match.sum())
    if prepends_bos:
        flat, lengths, offsets = _lists(dataset, "prompt_ids")
        rows = np.flatnonzero(lengths >= 2)
        starts = offsets[rows]
        n_bos = int(((flat[starts] == bos) & (flat[starts + 1] == bos)).sum())
    return n_appended, n_bos


def _say_fixes(counts: tuple[int, int] | None, n_rows: int | None, tokenizer, appended: list[int], name: str) -> None:
    """One line per kind of change; `counts` None for a stream (its rows are not counted)."""
    n_appended, n_bos = counts if counts is not None else (None, 0)
    if appended and n_appended != 0:
        logger.warning(
            "%s dataset: the tokenizer appends %s to every text, after the EOS %r that ends each completion: dropped "
            "from the completions (%s), which end with one EOS, as conversational rows do.",
            name, _tokens(tokenizer, appended), tokenizer.eos_token, _rows(n_appended, n_rows),
        )  # fmt: skip
    if n_bos:
        logger.warning(
            "%s dataset: prompts that already start with the BOS text %r get a second BOS from the tokenizer: one "
            "dropped (%s).",
            name, tokenizer.bos_token, _rows(n_bos, n_rows),
        )  # fmt: skip


def _rows(n: int | None, total: int | None) -> str:
    return "every row read" if n is None else f"{n} of {total} rows"


def _tokens(tokenizer, ids: list[int]) -> str:
    return " ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(ids))


def _check_ends_with_eos(dataset, tokenizer, name: str) -> None:
    if not isinstance(dataset, Dataset):
        return  # a stream is not scanned: its rows are fixed as they are read
    eos = tokenizer.eos_token_id
    flat, lengths, offsets = _lists(dataset, "completion_ids")
    last = np.full(len(lengths), -1)
    has = lengths > 0
    last[has] = flat[offsets[1:][has] - 1]
    bad = np.flatnonzero(last != (eos if eos is not None else -2)).tolist()
    if bad:
        ending = _tokens(tokenizer, [int(last[bad[0]])]) if last[bad[0]] >= 0 else "nothing"
        raise ValueError(
            f"The completion at {row_ref(bad[0])} of the {name} dataset ends with {ending}, not with the EOS token "
            f"{tokenizer.eos_token!r} (id {eos}){more_rows(bad, 'end so')}: the EOS text TRL appends does not "
            "tokenize to the EOS id. Set `tokenizer.eos_token` to a token of the tokenizer's vocabulary (one that "
            "`tokenizer.convert_tokens_to_ids` knows), or give conversational rows."
        )


def _say_if_turns_never_end(dataset, tokenizer, name: str) -> None:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if isinstance(dataset, Dataset):
        if len(dataset) == 0:
            return
        completion = dataset[0]["completion_ids"]
    else:
        first = next(iter(dataset), None)
        if first is None:
            return
        completion = first["completion_ids"]
    if completion and not special & set(completion):
        logger.warning(
            "%s dataset: the chat template ends the assistant turn with no special token (the first completion ends "
            "with %s), so the model is not trained to stop. Use a chat template that closes each assistant turn with "
            "an end-of-turn or EOS token.",
            name, _tokens(tokenizer, completion[-3:]),
        )  # fmt: skip
