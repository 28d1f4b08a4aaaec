"""Log-probs of several completions of one prompt, with the prompt run once and its keys and values reused."""

from __future__ import annotations

import torch

from .logps import HeadSettings, score_positions


def right_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` as right-padded `input_ids` and `attention_mask`, both [len(rows), longest row] (at least 1 wide)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def shared_prompt_logps(
    lm,
    settings: HeadSettings,
    prompts: list[list[int]],
    completions: list[list[list[int]]],
    pad_id: int,
) -> torch.Tensor:
    """Summed log-probs log p(y_bk | x_b) of completion k of every prompt b, the prompt run through the backbone once.

    KTO scores each prompt x_i with two completions: its own (the target row) and another row's (the KL row of the
    z0 estimate, paper eq. 4). A padded pass runs x_i twice; here x_i runs once with the KV cache on, the cache is
    repeated for the K completions, and the completions continue from it (positions continuing from each prompt's own
    length, the prompt padding masked out). The first completion token is scored from the prompt's last position.
    The value is the same as that of a padded pass over x_b + y_bk up to float rounding; the caller checks that per
    model, as attention kernels and caches differ.

    Args:
        lm: a causal LM with [`logps.install_completion_head`] applied (backbone at `settings.backbone_attr`);
            adapters and autocast are the caller's.
        prompts: B token lists, each at least 1 token.
        completions: B lists of K token lists each (K the same for every prompt; a completion may be empty).
        pad_id: padding token id.

    Returns:
        [B, K] summed log-probs (0 for an empty completion), in the output dtype of the LM head kernel.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token: its last position scores the first completion token")
    device = lm.get_output_embeddings().weight.device
    backbone = getattr(lm, settings.backbone_attr)
    n_rows, k = len(prompts), len(completions[0])
    prompt_ids, prompt_mask = right_padded(prompts, pad_id, device)
    prompt_lengths = prompt_mask.sum(-1)
    out = backbone(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    last = out.last_hidden_state[torch.arange(n_rows, device=device), prompt_lengths - 1]  # [B, H]

    flat = [c for row in completions for c in row]  # row b * K + k
    ids, mask = right_padded(flat, pad_id, device)  # [B K, C]
    first_labels = ids[:, :1].masked_fill(mask[:, :1] == 0, -100)
    total = score_positions(lm, settings, last.repeat_interleave(k, 0)[:, None], first_labels).log_probs[:, 0]
    if ids.size(1) > 1:  # the rest of each completion, scored from its own previous token
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)
        inputs, input_mask = ids[:, :-1], mask[:, :-1]
        positions = prompt_lengths.repeat_interleave(k)[:, None] + torch.arange(inputs.size(1), device=device)
        hidden = backbone(
            input_ids=inputs,
            attention_mask=torch.cat([prompt_mask.repeat_interleave(k, 0), input_mask], dim=1),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total = total + score_positions(lm, settings, hidden, labels).log_probs.sum(-1)
    return total.view(n_rows, k)


def rows_from_batch(batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[list[list[int]]]] | None:
    """(prompts, [[target completion, KL completion], ...]) of a collated KTO batch (right-padded `input_ids` /
    `KL_input_ids` [B, T] with their `attention_mask` and `completion_mask`), for [`shared_prompt_logps`]; None unless
    every row i has one KL row whose prompt is row i's, each prompt non-empty and each completion contiguous after it
    (e.g. a KL subset, left padding or a row without a prompt)."""
    keys = ("input_ids", "attention_mask", "completion_mask")
    if batch["KL_input_ids"].size(0) != batch["input_ids"].size(0):
        return None
    target = [_split_row(*row) for row in zip(*(batch[k].tolist() for k in keys))]
    kl = [_split_row(*row) for row in zip(*(batch[f"KL_{k}"].tolist() for k in keys))]
    if any(t is None or k is None or not t[0] or t[0] != k[0] for t, k in zip(target, kl)):
        return None
    return [t[0] for t in target], [[t[1], k[1]] for t, k in zip(target, kl)]


def _split_row(ids: list[int], attention: list[int], completion: list[int]) -> tuple[list[int], list[int]] | None:
    """(prompt, completion) of one right-padded row, or None when its tokens are not prompt, completion, padding."""
    length = sum(attention)
    start = completion.index(1) if 1 in completion else length
    expected_attention = [1] * length + [0] * (len(ids) - length)
    expected_completion = [0] * start + [1] * (length - start) + [0] * (len(ids) - length)
    if attention != expected_attention or completion != expected_completion:
        return None
    return ids[:start], ids[start:length]
