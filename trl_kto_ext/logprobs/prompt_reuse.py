"""The policy's KL rows continued from the prompt keys and values its gradient pass already computed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from trl_kto_ext.logprobs.completion import HeadSettings, length_buckets, score_positions
from trl_kto_ext.logprobs.shared_prompt import right_padded

try:  # transformers' base class of checkpointable decoder layers (5.x)
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - an older transformers: nothing is recorded under checkpointing
    GradientCheckpointingLayer = ()


class PromptRecorder(DynamicCache):
    """A cache handed to the policy's gradient pass that keeps, for each layer, the keys and values of the first
    `keep` positions (detached, copied) on that layer's first write and changes nothing: every write returns its own
    keys and values, as without a cache, so the pass and its gradients are those of a cache-free pass. Later writes
    (the recompute of gradient checkpointing in the backward pass) are passed through unrecorded.

    Shapes: each recorded key / value is [rows, KV heads, keep, head dim], in the rows' order in that forward call.
    """

    def __init__(self, config, keep: int):
        super().__init__(config=config)
        self.keep = keep
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.closed = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.closed and layer_idx not in self.recorded:
            self.recorded[layer_idx] = tuple(s[:, :, : self.keep].detach().clone() for s in (key_states, value_states))
        return key_states, value_states

    def close(self) -> None:
        """Frees what was recorded and records nothing more (the recorder lives on in the checkpointed forward's
        arguments until the backward pass)."""
        self.recorded, self.closed = {}, True


@dataclass
class Recording:
    """What a policy gradient pass left for its KL rows: per forward call, the batch rows it ran and their recorder
    (None where every prompt of those rows is a single token: nothing to keep)."""

    batch_id: int  # id() of the batch's KL_input_ids, so that the recording is used for its own batch only
    model_id: int  # id() of the causal LM that ran the pass
    prompts: list[list[int]]  # B prompts (token ids)
    kl_completions: list[list[int]]  # B KL completions, row i's continuing prompt i
    calls: list[tuple[list[int], PromptRecorder | None]]


@contextlib.contextmanager
def cache_kept_under_checkpointing(lm: torch.nn.Module) -> Iterator[None]:
    """transformers drops the cache argument of a checkpointed decoder layer (the backward replay would write it a
    second time); a [`PromptRecorder`] records the first write only, so it may stay. Restores each layer's setting."""
    layers = (
        [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)] if GradientCheckpointingLayer else []
    )
    before = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    try:
        for m in layers:
            m._can_checkpoint_with_cache = True
        yield
    finally:
        for m, value in zip(layers, before):
            if value is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = value


def close(recording: Recording) -> None:
    """Frees the recorded keys and values of every call ([`PromptRecorder.close`])."""
    for _, recorder in recording.calls:
        if recorder is not None:
            recorder.close()


def complete(recording: Recording, n_layers: int) -> bool:
    """Whether every recorder of `recording` holds all `n_layers` layers (not so where the model ignores the cache
    argument, e.g. under checkpointing without [`cache_kept_under_checkpointing`] support)."""
    return all(r is None or len(r.recorded) == n_layers for _, r in recording.calls)


@torch.no_grad()
def continued_kl_logps(
    lm, settings: HeadSettings, recording: Recording, pad_id: int, overhead_tokens: int
) -> torch.Tensor:
    """Summed log-probs log p(y_j | x_i) [B] of the KL rows, each continuing from the keys and values of its prompt
    x_i recorded in the gradient pass over (x_i, y_i) (the KL rows of the reference point z0 share the target rows'
    prompts; Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 6).

    Row i continues from the first len(x_i) - 1 recorded positions with x_i's last token followed by y_j (all but its
    last token), at positions len(x_i) - 1, ...; the other recorded positions are masked. The rows of each recorded
    call run in length buckets of their continuations. The value is that of an unpadded pass over x_i + y_j up to
    float rounding; the caller checks that per model, since attention kernels and caches differ.

    Args:
        lm: the policy's causal LM with the completion-only head installed (adapters and autocast are the caller's).
        recording: the [`Recording`] of the gradient pass over the same batch.
        pad_id: padding token id; overhead_tokens: the cost of one more forward call, in tokens (length buckets).

    Returns:
        [B] float32 summed log-probs (0 for an empty KL completion), in the batch's row order.
    """
    device = lm.get_output_embeddings().weight.device
    backbone = getattr(lm, settings.backbone_attr)
    out = torch.zeros(len(recording.prompts), device=device)
    for rows, recorder in recording.calls:
        kept = [len(recording.prompts[i]) - 1 for i in rows]  # recorded prompt positions each row reads
        inputs = [recording.prompts[i][-1:] + recording.kl_completions[i][:-1] for i in rows]
        inputs = [x if recording.kl_completions[i] else [] for x, i in zip(inputs, rows)]
        for group in length_buckets([len(x) for x in inputs], overhead_tokens):
            ids, mask = right_padded([inputs[g] for g in group], pad_id, device)
            labels, _ = right_padded([recording.kl_completions[rows[g]] for g in group], pad_id, device)
            labels = labels.masked_fill(mask == 0, -100)
            width = max(kept[g] for g in group)
            cache = None
            if width > 0:
                index = torch.tensor(group, device=device)
                data = [(k[index, :, :width], v[index, :, :width]) for _, (k, v) in sorted(recorder.recorded.items())]
                cache = DynamicCache(ddp_cache_data=data, config=lm.config)
            start = torch.tensor([kept[g] for g in group], device=device)
            prefix = (torch.arange(width, device=device)[None, :] < start[:, None]).long()
            hidden = backbone(
                input_ids=ids,
                attention_mask=torch.cat([prefix, mask], dim=1),
                position_ids=start[:, None] + torch.arange(ids.size(1), device=device),
                cache=cache,
                use_cache=cache is not None,
            ).last_hidden_state
            values = score_positions(lm, settings, hidden, labels).log_probs.sum(-1).float()
            out[torch.tensor([rows[g] for g in group], device=device)] = values
    return out
