"""`truncation_mode="keep_end"`: rows longer than `max_length` keep their whole completion and the end of the prompt.

TRL's collator keeps the start of prompt + completion, so a long conversation whose prompt fills `max_length` loses
every completion token and is dropped (TRL removed its `truncation_mode` in 2026; huggingface/trl#3878 asks for the
end to be kept). Here the prompt ids of such a row are shortened before collation:

- a conversation keeps its system turn (where the chat template has one, given or injected) and as many whole final
  turns, starting at a user turn, as fit: the prompt is rendered again from those messages with the same chat
  template arguments, and used only when the new ids are a start of the full rendering followed by its end (so the
  completion still follows the same tokens);
- otherwise (text prompts, or no whole turn fits) the prompt keeps its last tokens, after its first token when that is
  the tokenizer's BOS.

The completion ids are never changed. A row whose completion alone has `max_length` tokens or more is left to the
default truncation. One line says how many rows were shortened.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from trl_kto_ext.trl_internals import tokenize_row

logger = logging.getLogger(__name__)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render(processing_class, messages: list[dict], row: dict[str, Any]) -> list[int]:
    """Prompt ids of `messages` rendered as TRL's KTOTrainer renders a prompt (generation prompt, tools, kwargs)."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"tools": tools, **(row.get("chat_template_kwargs") or {})}
    return list(tokenize_row(processing_class, messages, add_generation_prompt=True, **kwargs)["input_ids"])


def whole_turns(processing_class, row: dict[str, Any], budget: int) -> list[int] | None:
    """The prompt ids of the system turn (if any) and the most whole final turns, starting at a user turn, whose
    rendering has at most `budget` tokens and is a start of `row["prompt_ids"]` followed by its end; None if none."""
    messages, full = row["prompt"], list(row["prompt_ids"])
    head = [m for m in messages[:1] if m.get("role") == "system"]
    rest = messages[len(head) :]
    starts = [i for i, m in enumerate(rest) if m.get("role") == "user" and i > 0]
    for start in starts:  # earliest first: the first that fits keeps the most turns
        ids = _render(processing_class, head + rest[start:], row)
        if len(ids) > budget:
            continue
        shared = common_prefix_length(ids, full)
        tail = len(ids) - shared
        if 0 < tail <= len(full) - shared and ids[shared:] == full[len(full) - tail :]:
            return ids
        return None  # the template renders later turns differently on their own: keep tokens instead
    return None


def last_tokens(prompt_ids: list[int], budget: int, bos_token_id: int | None) -> list[int]:
    """The last `budget` prompt ids (a leading BOS kept in front of them)."""
    head = prompt_ids[:1] if prompt_ids and bos_token_id is not None and prompt_ids[0] == bos_token_id else []
    keep = max(budget - len(head), 1)
    return head + prompt_ids[-keep:]


def shorten_row(row: dict[str, Any], max_length: int, processing_class, bos_token_id: int | None) -> dict[str, Any]:
    """`{"prompt_ids": ...}` for one tokenized row: unchanged when it fits or its completion alone does not leave
    room for a prompt token; else the end of the prompt (whole final turns for a conversation, where they fit)."""
    prompt_ids, completion_ids = list(row["prompt_ids"]), row["completion_ids"]
    budget = max_length - len(completion_ids)
    if len(prompt_ids) + len(completion_ids) <= max_length or budget < 1:
        return {"prompt_ids": prompt_ids}
    kept = None
    if isinstance(row.get("prompt"), list) and processing_class is not None:
        kept = whole_turns(processing_class, row, budget)
    if kept is None:
        kept = last_tokens(prompt_ids, budget, bos_token_id)
    return {"prompt_ids": kept}


def keep_end(dataset, max_length: int | None, processing_class, name: str):
    """`dataset` (tokenized: `prompt_ids`, `completion_ids`, and the raw `prompt`) with the prompts of rows longer
    than `max_length` shortened by [`shorten_row`]; logs how many rows were shortened. A stream is mapped lazily."""
    from datasets import Dataset

    if max_length is None:
        return dataset
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    kwargs = {
        "max_length": max_length,
        "processing_class": processing_class,
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
    }
    if not isinstance(dataset, Dataset):
        return dataset.map(shorten_row, fn_kwargs=kwargs)
    lengths = [len(p) + len(c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"])]
    long_rows = [i for i, n in enumerate(lengths) if n > max_length]
    if not long_rows:
        return dataset
    before = dataset.select(long_rows)["prompt_ids"]
    dataset = dataset.map(shorten_row, fn_kwargs=kwargs, desc=f"Keeping the end of long {name} prompts")
    after = dataset.select(long_rows)["prompt_ids"]
    shortened = sum(1 for old, new in zip(before, after) if len(new) < len(old))
    if shortened and _main_process():
        logger.warning(
            "%s dataset: truncation_mode='keep_end' shortened the prompt of %d of %d rows longer than max_length=%d "
            "(the completion kept whole; a conversation keeps its system turn and whole final turns where they fit).",
            name,
            shortened,
            len(lengths),
            max_length,
        )
    return dataset


def truncate_prompts(dataset, args, processing_class, name: str):
    """[`keep_end`] when `args.truncation_mode` is `"keep_end"`; the dataset unchanged for `"keep_start"` (the
    collator then keeps the start, and `check_tokenized` drops rows whose prompt fills max_length)."""
    if getattr(args, "truncation_mode", "keep_start") != "keep_end":
        return dataset
    return keep_end(dataset, args.max_length, processing_class, name)


def _main_process() -> bool:
    from accelerate import PartialState

    return not PartialState._shared_state or PartialState().is_main_process
