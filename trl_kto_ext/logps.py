"""Completion-only log-probabilities: TRL's chunked log-prob kernel on the completion positions only, in length buckets."""

from __future__ import annotations

import functools
import inspect
import types
from contextlib import nullcontext
from typing import NamedTuple

import torch

# TRL's fused LM head scores only the labelled positions on Triton devices and every position elsewhere (to keep tile
# shapes fixed on Neuron). The kernel and its settings are TRL's; only the choice of rows differs, so these are read
# from TRL rather than re-implemented.
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput, maybe_gather_lm_head_ctx
from trl.trainer.utils import _ChunkedLogProbFunction as _LogProbKernel

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


def trl_head_settings(model: torch.nn.Module) -> HeadSettings | None:
    """The settings of the TRL fused head patched on `model` (the causal LM itself), or None where there is none or
    its closure no longer has the expected names (another TRL version): the caller then keeps TRL's path."""
    func = getattr(model.__dict__.get("forward"), "__func__", None)
    if func is None or func.__code__.co_name != "_fused_forward":
        return None
    values = inspect.getclosurevars(func).nonlocals
    try:
        return HeadSettings(*(values[name] for name in HeadSettings._fields[:-1]), values.get("backbone_attr"))
    except KeyError:
        return None


def install_completion_head(model: torch.nn.Module) -> bool:
    """Adds a `completion_only=(field, ...)` mode to the TRL fused forward of `model` (the causal LM, not a PEFT or
    DDP wrapper): the backbone runs as usual and only the labelled positions go through the LM head, computing only
    the named fields among `"log_probs"`, `"entropy"`, `"mean_logits"`. Calls without it run TRL's forward unchanged.
    Returns False (and changes nothing) where `model` has no TRL fused head whose settings can be read."""
    if getattr(model, _HEAD_FLAG, False):
        return True
    settings = trl_head_settings(model)
    if settings is None or settings.backbone_attr is None:
        return False
    trl_forward = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: `generate` validates its kwargs against it
    def forward(self, *args, completion_only=None, **kwargs):
        if completion_only is None:
            return trl_forward(*args, **kwargs)
        return _completion_forward(self, settings, tuple(completion_only), *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    setattr(model, _HEAD_FLAG, True)
    return True


def _completion_forward(self, settings: HeadSettings, fields, *args, labels, **kwargs) -> FusedCausalLMOutput:
    kwargs["use_cache"] = False
    hidden = getattr(self, settings.backbone_attr)(*args, **kwargs).last_hidden_state[:, :-1]
    lm_head = self.get_output_embeddings()
    hidden = hidden.to(lm_head.weight.device)
    labels = labels[:, 1:].to(lm_head.weight.device)
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
    **model_kwargs,
) -> FusedCausalLMOutput:
    """Per-token log-probs (and the other `fields`) of the completion tokens, through a model whose causal LM has
    [`install_completion_head`]; `model` may be that LM or a PEFT / DDP wrapper of it.

    Args:
        input_ids, attention_mask, completion_mask: [B, T], right-padded (as TRL's KTO collator builds them).
        fields: per-token outputs to compute, among `"log_probs"`, `"entropy"`, `"mean_logits"`.
        bucket_overhead_tokens: when not None, the rows are run in length buckets ([`length_buckets`]), each trimmed
            to its longest row (exact: trailing padding of a causal model changes no earlier position). None: one call.
        model_kwargs: further model inputs; [B, T] tensors among them are split with the rows.

    Returns:
        A `FusedCausalLMOutput` whose requested fields are [B, T-1] (position t scores token t+1; zero outside the
        completion), in the row order given.
    """
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    lengths = right_padded_lengths(attention_mask) if bucket_overhead_tokens is not None else None
    groups = length_buckets(lengths, bucket_overhead_tokens) if lengths is not None else None
    if groups is None or len(groups) == 1:
        return model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, completion_only=fields, **model_kwargs
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
