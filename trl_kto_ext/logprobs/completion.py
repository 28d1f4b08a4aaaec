"""Completion-only log-probabilities: TRL's chunked log-prob kernel on the completion positions only, in length buckets."""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)
import functools
import inspect
import types
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
from accelerate.utils import convert_to_fp32

# TRL's fused LM head scores only the labelled positions on Triton devices and every position elsewhere (to keep tile
# shapes fixed on Neuron). The kernel and its settings are TRL's; only the choice of rows differs, so these are read
# from TRL rather than re-implemented.
from trl_kto_ext.trl_internals import CHUNKED_LOGPROB_CHUNK_SIZE as _CHUNKED_LOGPROB_CHUNK_SIZE
from trl_kto_ext.trl_internals import ChunkedLogProbFunction as _LogProbKernel
from trl_kto_ext.trl_internals import FusedCausalLMOutput, maybe_gather_lm_head_ctx

try:  # FSDP2 exposes sharded parameters as DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()

# Extra cost of one more forward call, in tokens, when splitting a batch into length buckets: on CPU a forward costs
# about its token count; on accelerators small calls are dominated by launch overhead.
BUCKET_OVERHEAD_TOKENS = {"cpu": 64}
DEFAULT_BUCKET_OVERHEAD_TOKENS = 4096
_HEAD_FLAG = "_kto_ext_completion_head"


class HeadSettings(NamedTuple):
    """The settings TRL's `add_fused_lm_head` derived from the model config (read from its closure)."""

    temperature: float
    final_logit_softcapping: float | None
    logit_scale: float
    cast_lm_head_to_fp32: bool
    backbone_attr: str


def _trl_fused_forward(model: torch.nn.Module):
    """(function, depth): what `model`'s instance forward is, following `__wrapped__` from it. function: TRL's
    `_fused_forward`, `_HEAD_FLAG` where [`install_completion_head`] already added its head, or None; depth: how many
    wrappers sit above it (accelerate's `prepare` under bf16/fp16 puts an autocast and an fp32 output cast there)."""
    forward, depth = model.__dict__.get("forward"), 0
    while forward is not None and depth < 16:
        if getattr(forward, _HEAD_FLAG, False):
            return _HEAD_FLAG, depth
        func = getattr(forward, "__func__", forward)
        if getattr(getattr(func, "__code__", None), "co_name", None) == "_fused_forward":
            return func, depth
        forward, depth = getattr(func, "__wrapped__", None), depth + 1
    return None, 0


def trl_head_settings(model: torch.nn.Module) -> HeadSettings | None:
    """The settings of the TRL fused head patched on `model` (the causal LM itself, possibly wrapped by accelerate's
    mixed precision), or None where there is none or its closure no longer has the expected names (another TRL
    version): the caller then keeps TRL's path."""
    func, _ = _trl_fused_forward(model)
    if func is None or func == _HEAD_FLAG:
        return None
    values = inspect.getclosurevars(func).nonlocals
    try:
        return HeadSettings(*(values[name] for name in HeadSettings._fields[:-1]), values.get("backbone_attr"))
    except KeyError:
        return None


def install_completion_head(
    model: torch.nn.Module, autocast: Callable[[], AbstractContextManager] | None = None
) -> bool:
    """Adds a `completion_only=(field, ...)` mode to the TRL fused forward of `model` (the causal LM, not a PEFT or
    DDP wrapper): the backbone runs as usual and only the labelled positions go through the LM head, computing only
    the named fields among `"log_probs"`, `"entropy"`, `"mean_logits"`. Calls without it run TRL's forward unchanged.

    Args:
        autocast: where accelerate's `prepare` wrapped `model`'s forward for mixed precision (an autocast around TRL's
            forward and an fp32 cast of its outputs), the same context (`Accelerator.autocast`): completion-only calls
            run under it and their outputs are cast to fp32, as TRL's calls are. Unused on an unwrapped forward.

    Returns:
        False (and changes nothing) where `model` has no TRL fused head whose settings can be read, or its forward is
        wrapped by something other than accelerate's mixed precision; True once the head is there.

    Raises:
        ValueError: the forward carries accelerate's mixed-precision wrapper and `autocast` is None.
    """
    # The mark lives on the installed forward itself: a copy whose instance forwards were dropped (`frozen_copy`,
    # `host_copy`) must get a head again, not be taken for one that has it.
    found, depth = _trl_fused_forward(model)
    if found == _HEAD_FLAG:
        return True  # installed directly, or inside the mixed-precision wrapper (installed before `prepare`)
    settings = trl_head_settings(model)
    if settings is None or settings.backbone_attr is None:
        return False
    if depth and "_original_forward" not in model.__dict__:  # accelerate marks its mixed-precision wrapper so
        return False
    if depth and autocast is None:
        raise ValueError(
            f"{type(model).__name__}'s forward was prepared by accelerate for mixed precision: pass "
            "autocast=accelerator.autocast so that completion-only calls run under the same autocast."
        )
    amp = autocast if depth else None
    trl_forward = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: `generate` validates its kwargs against it
    def forward(self, *args, completion_only=None, **kwargs):
        if completion_only is None:
            return trl_forward(*args, **kwargs)
        if amp is None:
            return _completion_forward(self, settings, tuple(completion_only), *args, **kwargs)
        with amp():  # what accelerate's wrapper does around TRL's forward
            out = _completion_forward(self, settings, tuple(completion_only), *args, **kwargs)
        return convert_to_fp32(out)

    setattr(forward, _HEAD_FLAG, True)
    forward.head_settings = settings
    model.forward = types.MethodType(forward, model)
    return True


def installed_head_settings(model: torch.nn.Module) -> HeadSettings | None:
    """The [`HeadSettings`] of the head [`install_completion_head`] put on `model`, or None where it has none."""
    forward, depth = model.__dict__.get("forward"), 0
    while forward is not None and depth < 16:
        if getattr(forward, _HEAD_FLAG, False):
            return forward.head_settings
        forward, depth = getattr(getattr(forward, "__func__", forward), "__wrapped__", None), depth + 1
    return None


def _completion_forward(self, settings: HeadSettings, fields, *args, labels, **kwargs) -> FusedCausalLMOutput:
    kwargs["use_cache"] = False
    hidden = getattr(self, settings.backbone_attr)(*args, **kwargs).last_hidden_state[:, :-1]
    return score_positions(self, settings, hidden, labels[:, 1:], fields)


def score_positions(lm, settings: HeadSettings, hidden, labels, fields=("log_probs",)) -> FusedCausalLMOutput:
    """TRL's chunked log-prob kernel on the labelled positions only ([`head_log_probs`] for log-probs alone without
    gradient on CPU).

    Args:
        lm: the causal LM whose output embeddings score `hidden`; settings: its head's [`HeadSettings`].
        hidden: [B, T, H] backbone outputs; position t scores `labels[:, t]`.
        labels: [B, T] token ids, -100 where nothing is scored.

    Returns:
        A `FusedCausalLMOutput` whose requested `fields` are [B, T] (zero where `labels` is -100).
    """
    lm_head = lm.get_output_embeddings()
    hidden = hidden.to(lm_head.weight.device)
    labels = labels.to(lm_head.weight.device)
    mask = labels != -100
    weight, bias = lm_head.weight, lm_head.bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    autocast = nullcontext()
    if settings.cast_lm_head_to_fp32:
        hidden = hidden.float()
        autocast = torch.autocast(hidden.device.type, enabled=False)
    with autocast, maybe_gather_lm_head_ctx(weight, bias):
        if fields == ("log_probs",) and not torch.is_grad_enabled() and hidden.device.type == "cpu":
            per_token = (head_log_probs(hidden[mask], weight, bias, labels[mask], settings), None, None, None, None)
        else:
            per_token = _LogProbKernel.apply(
                hidden[mask],
                weight,
                bias,
                labels[mask],
                settings.temperature,
                _CHUNKED_LOGPROB_CHUNK_SIZE,
                settings.final_logit_softcapping,
                settings.logit_scale,
                fields,
            )
    # `masked_scatter` keeps the output connected to the graph even when no position is labelled.
    log_probs, entropy, _, mean_logits, _ = (
        None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token
    )
    return FusedCausalLMOutput(log_probs=log_probs, entropy=entropy, mean_logits=mean_logits, label_mask=mask)


def head_log_probs(hidden, weight, bias, targets, settings: HeadSettings, max_elements: int = 1 << 25) -> torch.Tensor:
    """log softmax(z)[target] per token, z = (hidden @ weight.T + bias) x logit_scale, soft-capped, / temperature (the
    transform of TRL's head): no gradient, in token chunks of at most `max_elements` logits, each reduced by
    `torch.logsumexp`. On CPU, where TRL's kernel has no Triton and its torch fallback makes several passes over
    every tile (two of them multiplications by 1.0 with the default settings), this takes about a third less time
    (the reference precompute of the benchmark's short rows, 2 threads: 3.2 s in TRL's kernel, 2.2 s here).

    Args:
        hidden: [N, H]; weight: [V, H]; bias: [V] or None; targets: [N] token ids.

    Returns:
        [N] float32 log-probabilities.
    """
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
    dtype = dtype or hidden.dtype
    weight = weight.to(dtype)
    chunk = max(1, max_elements // weight.size(0))
    out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), chunk):
        z = torch.mm(hidden[start : start + chunk].to(dtype), weight.t())
        if bias is not None:
            z = z + bias.to(dtype)
        z = z.float()
        if settings.logit_scale != 1.0:
            z = z * settings.logit_scale
        if settings.final_logit_softcapping is not None:
            z = settings.final_logit_softcapping * torch.tanh(z / settings.final_logit_softcapping)
        if settings.temperature != 1.0:
            z = z * (1 / settings.temperature)
        target = z.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
        out[start : start + chunk] = target - torch.logsumexp(z, dim=-1)
    return out


def length_buckets(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """Groups of row indices, each group padded to its own longest row, minimising the padded token count plus
    `overhead_tokens` per group (exact dynamic programme over the rows sorted by length; O(B^2)).

    Example: lengths [5, 300, 7, 290] with overhead 64 give [[0, 2], [3, 1]] (2 x 7 + 2 x 300 + 128 < 4 x 300).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of rows order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # last group = order[i:j], padded to sorted_lengths[j - 1]
            cost = best[i] + (j - i) * sorted_lengths[j - 1] + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Row lengths [B] of a right-padded mask [B, T], or None when some row has padding before a real token."""
    lengths = attention_mask.sum(-1)
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
        return None
    return lengths.tolist()


def completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    fields: tuple[str, ...] = ("log_probs",),
    bucket_overhead_tokens: int | None = None,
    call_kwargs: Callable[[list[int]], dict] | None = None,
    **model_kwargs,
) -> FusedCausalLMOutput:
    """Per-token log-probs (and the other `fields`) of the completion tokens, through a model whose causal LM has
    [`install_completion_head`]; `model` may be that LM or a PEFT / DDP wrapper of it.

    Args:
        input_ids, attention_mask, completion_mask: [B, T], right-padded (as TRL's KTO collator builds them).
        fields: per-token outputs to compute, among `"log_probs"`, `"entropy"`, `"mean_logits"`.
        bucket_overhead_tokens: when not None, the rows are run in length buckets ([`length_buckets`]), each trimmed
            to its longest row (exact: trailing padding of a causal model changes no earlier position). None: one call.
        call_kwargs: given the batch rows of one forward call (in the order that call runs them), further inputs of
            that call only (e.g. a cache recording the prompts' keys and values).
        model_kwargs: further model inputs; [B, T] tensors among them are split with the rows.

    Returns:
        A `FusedCausalLMOutput` whose requested fields are [B, T-1] (position t scores token t+1; zero outside the
        completion), in the row order given.
    """
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    lengths = right_padded_lengths(attention_mask) if bucket_overhead_tokens is not None else None
    groups = length_buckets(lengths, bucket_overhead_tokens) if lengths is not None else None
    if groups is None or len(groups) == 1:
        extra = call_kwargs(list(range(input_ids.size(0)))) if call_kwargs else {}
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            completion_only=fields,
            **model_kwargs,
            **extra,
        )
    width = input_ids.size(1) - 1
    pieces = {}
    for rows in groups:
        length = max(lengths[i] for i in rows)
        index = torch.tensor(rows, device=input_ids.device)
        extra = {
            k: (v[index, :length] if isinstance(v, torch.Tensor) and v.shape[:2] == input_ids.shape else v)
            for k, v in model_kwargs.items()
        }
        extra.update(call_kwargs(rows) if call_kwargs else {})
        out = model(
            input_ids=input_ids[index, :length],
            attention_mask=attention_mask[index, :length],
            labels=labels[index, :length],
            completion_only=fields,
            **extra,
        )
        for name in ("log_probs", "entropy", "mean_logits"):
            value = getattr(out, name)
            if value is not None:
                # pad back to the batch width; rows keep their order through index_copy
                value = torch.nn.functional.pad(value, (0, width - value.size(1)))
                pieces.setdefault(name, []).append((index, value))
    result = {}
    for name, parts in pieces.items():
        full = parts[0][1].new_zeros(input_ids.size(0), width)
        for index, value in parts:
            full = full.index_copy(0, index, value)
        result[name] = full
    return FusedCausalLMOutput(**result, label_mask=labels[:, 1:] != -100)


def bucket_overhead(device: torch.device) -> int:
    """Tokens one more forward call is worth on `device` (see `BUCKET_OVERHEAD_TOKENS`)."""
    return BUCKET_OVERHEAD_TOKENS.get(device.type, DEFAULT_BUCKET_OVERHEAD_TOKENS)


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Row indices grouped into packs of at most `width` tokens (first-fit decreasing; every length <= `width`),
    each pack in the order its rows were placed.

    Example: lengths [5, 3, 4, 2] with width 7 give [[0, 3], [2, 1]].
    """
    packs: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for p, room in enumerate(free):
            if lengths[i] <= room:
                packs[p].append(i)
                free[p] -= lengths[i]
                break
        else:
            packs.append([i])
            free.append(width - lengths[i])
    return packs


@torch.no_grad()
def packed_completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    capacity: int | None = None,
) -> torch.Tensor | None:
    """Per-token completion log-probs [B, T-1] (as [`completion_logps`] returns them, zero outside the completion)
    from a padding-free, no-gradient pass: the rows' real tokens are packed end to end into rows of at most
    `capacity` tokens (default T, so no pack attends over more than the widest padded row; [`pack_rows`]), with `position_ids` restarting at 0 for every row and no `attention_mask`, from which
    transformers builds block-diagonal causal masks. Exact only where the model's attention honours that mask: the
    caller checks it per model. None when a row has padding before a real token (not right-padded)."""
    lengths = right_padded_lengths(attention_mask)
    if lengths is None:
        return None
    width = max(capacity or 0, input_ids.size(1))
    packs = pack_rows(lengths, width)
    ids = input_ids.new_zeros(len(packs), width)
    positions = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    target_labels = input_ids.masked_fill(completion_mask == 0, -100)
    offsets = {}
    for p, rows in enumerate(packs):
        start = 0
        for i in rows:
            n = lengths[i]
            ids[p, start : start + n] = input_ids[i, :n]
            positions[p, start : start + n] = torch.arange(n, device=ids.device)
            # the first token of a row is never a target: it would be scored from the previous row's last token
            labels[p, start + 1 : start + n] = target_labels[i, 1:n]
            offsets[i] = (p, start)
            start += n
        # the unused tail of a pack is its own segment (positions from 0), after every real token: it changes nothing
        positions[p, start:] = torch.arange(width - start, device=ids.device)
    packed = model(input_ids=ids, position_ids=positions, labels=labels, completion_only=("log_probs",)).log_probs
    out = packed.new_zeros(input_ids.size(0), input_ids.size(1) - 1)
    for i, (p, start) in offsets.items():
        out[i, : lengths[i] - 1] = packed[p, start : start + lengths[i] - 1]
    return out
