"""Reference log-probs computed in one length-sorted pass over all sequences, persisted on disk by model and data."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset

from trl_kto_ext.errors import NOTICE
from trl_kto_ext.logprobs.fast_path import TARGET_KEYS, fast_path

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def default_cache_dir() -> str:
    """`$TRL_KTO_EXT_REF_CACHE`, else `~/.cache/trl_kto_ext/ref_logps`."""
    return os.environ.get("TRL_KTO_EXT_REF_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "trl_kto_ext", "ref_logps"
    )


def data_fingerprint(dataset: Dataset, columns: list[str]) -> str:
    """blake2b of the token ids of `columns` ([N] lists of ints each), row by row with their lengths, and of N."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{len(dataset)}|{columns}".encode())
    for column in columns:
        values = dataset.with_format("arrow")[column]  # the selected rows, in order
        h.update(pc.list_value_length(values).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        h.update(pc.list_flatten(values).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return h.hexdigest()


def cache_key(model_hash: str, data_hash: str, settings: dict) -> str:
    """File stem naming the model weights (`model_hash`: sha256 of every tensor of the reference, TRL's
    `hash_module`), the tokenized data and the `settings` that change the values (precision, max_length, ...)."""
    payload = json.dumps({"format": CACHE_FORMAT, "model": model_hash, "data": data_hash, **settings}, sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()


def load(path: str, n_rows: int, with_kl: bool) -> dict[str, torch.Tensor] | None:
    """The cached tensors ([N] float32 `ref_logps`, and `ref_KL_logps` when `with_kl`) or None (absent, unreadable or
    of another shape: a stale or partial file is recomputed, never used)."""
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as error:  # a truncated or foreign file
        logger.warning("Ignoring unreadable reference cache %s (%s).", path, error)
        return None
    keys = ("ref_logps", "ref_KL_logps") if with_kl else ("ref_logps",)
    if any(k not in saved or saved[k].shape != (n_rows,) for k in keys):
        return None
    return {k: saved[k] for k in keys}


def save(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Writes `tensors` atomically (a temporary file renamed), so a concurrent reader never sees half a file.

    Raises:
        OSError, RuntimeError (torch.save): the folder cannot be created or written (no temporary file is left).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save({k: v.float().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sequences(dataset: Dataset, completion_column: str, max_length: int | None) -> list[tuple[list[int], int]]:
    """(prompt + completion ids, number of prompt tokens) per row, truncated at `max_length` as TRL's collator does."""
    rows = []
    for prompt, completion in zip(dataset["prompt_ids"], dataset[completion_column]):
        ids = list(prompt) + list(completion)
        if max_length is not None:
            ids = ids[:max_length]
        rows.append((ids, min(len(prompt), len(ids))))
    return rows


def sorted_pass(trainer, model, seqs: list[tuple[list[int], int]], token_budget: int, pad_id: int) -> torch.Tensor:
    """Summed completion log-probs [len(seqs)] under `model` (the reference, inside the caller's no-grad context), in
    batches of length-sorted sequences holding at most `token_budget` padded tokens (at least one row each)."""
    device = trainer.accelerator.device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = torch.empty(len(seqs), dtype=torch.float32)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(seqs[order[end]][0]) <= token_budget:
            end += 1
        rows = order[start:end]
        width = max(len(seqs[i][0]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        completion = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            tokens, n_prompt = seqs[i]
            ids[r, : len(tokens)] = torch.tensor(tokens)
            mask[r, : len(tokens)] = 1
            completion[r, n_prompt : len(tokens)] = 1
        batch = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "completion_mask": completion.to(device),
        }
        values = fast_path(trainer).sequence_logps(model, batch, TARGET_KEYS)
        if values is None:  # TRL's fused head on every position
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            per_token = model(**{k: batch[k] for k in TARGET_KEYS[:2]}, labels=labels, fused_lm_head=True).log_probs
            values = per_token[:, -(width - 1) :].sum(-1)
        out[torch.tensor(rows)] = values.float().cpu()
        start = end
    return out


_CHECK_ROWS = 4  # rows of the first batch of `shared_prompt_pass`, run both ways to check the model


def shared_prompt_pass(trainer, model, seqs, token_budget: int, pad_id: int) -> torch.Tensor | None:
    """What [`sorted_pass`] returns for `seqs` = N target sequences then their N KL sequences (row i's KL sequence
    has row i's prompt), with each prompt run once for both ([`FastPath.shared_prompt_logps`]), in batches of rows
    sorted by length holding at most `token_budget` padded tokens (both calls of a batch together). The first batch,
    the `_CHECK_ROWS` shortest rows, is also run through [`sorted_pass`] as the model's check. None (the caller runs
    [`sorted_pass`]) where a prompt is empty or differs between a row and its KL row, or the model fails the check."""
    n = len(seqs) // 2
    rows = []
    for (target, n_prompt), (kl, kl_prompt) in zip(seqs[:n], seqs[n:]):
        if n_prompt == 0 or kl_prompt != n_prompt or kl[:n_prompt] != target[:n_prompt]:
            return None
        rows.append((target[:n_prompt], [target[n_prompt:], kl[n_prompt:]]))
    # Each row runs as prompt + its longer completion (sorted by that length), the shorter continuing from the cache.
    full = [len(prompt) + max(map(len, completions)) for prompt, completions in rows]
    rest = [min(map(len, completions)) for _, completions in rows]
    order = sorted(range(n), key=lambda i: full[i])
    out = torch.empty(n, 2, dtype=torch.float32)
    start = 0
    while start < n:
        end, widest, widest_rest = start, 0, 0
        while end < n:
            w, r = max(widest, full[order[end]]), max(widest_rest, rest[order[end]])
            if end > start and ((end + 1 - start) * (w + r) > token_budget or (start == 0 and end == _CHECK_ROWS)):
                break
            widest, widest_rest, end = w, r, end + 1
        batch = order[start:end]

        def padded(batch=batch):  # the same values from the padded pass, for the first batch's check
            both = [seqs[i] for i in batch] + [seqs[n + i] for i in batch]
            return sorted_pass(trainer, model, both, token_budget, pad_id).view(2, -1).T

        prompts, completions = [rows[i][0] for i in batch], [rows[i][1] for i in batch]
        values = fast_path(trainer).shared_prompt_logps(model, prompts, completions, padded)
        if values is None:
            return None
        out[torch.tensor(batch)] = values.float().cpu()
        start = end
    return torch.cat([out[:, 0], out[:, 1]])


def precompute(trainer, dataset, name: str, batch_size: int):
    """`dataset` with `ref_logps` (and `ref_KL_logps` when `trainer.calculate_KL`) columns, read from the on-disk
    cache or computed in one sorted pass over the target and KL sequences together and then saved. None where this
    path does not apply (several processes, DeepSpeed, vision data, no tokenized columns): the caller runs TRL's."""
    args = trainer.args
    with_kl = bool(trainer.calculate_KL)
    columns = ["prompt_ids", "completion_ids"] + (["KL_completion_ids"] if with_kl else [])
    if (
        not isinstance(dataset, Dataset)
        or trainer.accelerator.num_processes > 1
        or trainer.is_deepspeed_enabled
        or getattr(trainer, "_is_vision_dataset", False)
        or any(c not in dataset.column_names for c in columns)
    ):
        return None
    path = None
    model_hash = getattr(trainer, "_precompute_model_hash", None)
    if getattr(args, "ref_cache", True) and model_hash:
        settings = {
            "model_class": type(trainer.accelerator.unwrap_model(trainer.ref_model or trainer.model)).__name__,
            "bf16": bool(args.bf16),
            "fp16": bool(args.fp16),
            "max_length": args.max_length,
            "with_kl": with_kl,
        }
        key = cache_key(model_hash, data_fingerprint(dataset, columns), settings)
        path = os.path.join(getattr(args, "ref_cache_dir", None) or default_cache_dir(), f"{key}.pt")
        cached = load(path, len(dataset), with_kl)
        if cached is not None:
            logger.warning("Reference log-probs for the %s set: cache hit, read from %s", name, path, extra=NOTICE)
            return _with_columns(dataset, cached)
    started = time.perf_counter()
    seqs = sequences(dataset, "completion_ids", args.max_length)
    if with_kl:
        seqs += sequences(dataset, "KL_completion_ids", args.max_length)
    budget = batch_size * max(len(s[0]) for s in seqs)  # never more padded tokens per call than TRL's widest batch
    pad_id = getattr(trainer._tokenizer, "pad_token_id", None) or 0
    with trainer._reference() as model, trainer.accelerator.autocast():
        values = shared_prompt_pass(trainer, model, seqs, budget, pad_id) if with_kl else None
        if values is None:
            values = sorted_pass(trainer, model, seqs, budget, pad_id)
    tensors = {"ref_logps": values[: len(dataset)]}
    if with_kl:
        tensors["ref_KL_logps"] = values[len(dataset) :]
    seconds = time.perf_counter() - started
    if path is None:
        logger.warning(
            "Reference log-probs for the %s set computed in %.1f s (cache off).", name, seconds, extra=NOTICE
        )
    elif trainer.accelerator.is_main_process:
        try:
            save(path, tensors)
        except (OSError, RuntimeError) as error:  # an unwritable cache costs a recomputation next time, not the run
            logger.warning(
                "Reference log-probs for the %s set computed in %.1f s; not cached: writing %s failed (%s). Set "
                "`ref_cache_dir` to a writable folder (or $TRL_KTO_EXT_REF_CACHE), or `ref_cache=False`.",
                name, seconds, path, error,
            )  # fmt: skip
        else:
            logger.warning(
                "Reference log-probs for the %s set: cache miss, computed in %.1f s, saved to %s",
                name, seconds, path, extra=NOTICE,
            )  # fmt: skip
    return _with_columns(dataset, tensors)


def _with_columns(dataset: Dataset, tensors: dict[str, torch.Tensor]) -> Dataset:
    for column, values in tensors.items():
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        dataset = dataset.add_column(column, values.float().numpy())
    return dataset
