"""Log-probs of several completions of one prompt, with the prompt run once and its keys and values reused."""

from __future__ import annotations

import torch

from trl_kto_ext.logprobs.completion import HeadSettings, score_positions


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
    reference point z0; Ethayarajh et al. 2024, arXiv 2402.01306). A padded pass runs x_i twice. Here each row's longest completion runs with its prompt
    as one right-padded sequence with the KV cache on; the other completions continue from that cache (repeated for
    each), with the first completion's keys and all padding masked out and positions continuing from the prompt's
    own length. The first token of every completion is scored from the prompt's last position. The value is that of
    an unpadded pass over x_b + y_bk up to float rounding; the caller checks that per model, since attention kernels
    and caches differ.

    Args:
        lm: a causal LM with [`logps.install_completion_head`] applied (backbone at `settings.backbone_attr`);
            adapters and autocast are the caller's.
        prompts: B token lists, each at least 1 token.
        completions: B lists of K token lists each (K the same for every prompt; a completion may be empty).
        pad_id: padding token id.

    Returns:
        [B, K] summed log-probs (0 for an empty completion), in the output dtype of the LM head kernel.

    Raises:
        ValueError: a prompt is empty (nothing would score its completions' first tokens).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token: its last position scores the first completion token")
    device = lm.get_output_embeddings().weight.device
    backbone = getattr(lm, settings.backbone_attr)
    n_rows, k = len(prompts), len(completions[0])
    main = [max(range(k), key=lambda j: len(row[j])) for row in completions]  # the longest completion of each row
    out = torch.zeros(n_rows, k, device=device)

    # 1. prompt + longest completion, cache kept
    ids, mask = right_padded([p + row[m] for p, row, m in zip(prompts, completions, main)], pad_id, device)
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
    scored = torch.arange(ids.size(1), device=device)[None, :] >= prompt_lengths[:, None]
    labels = ids.masked_fill(~scored | (mask == 0), -100)[:, 1:]
    result = backbone(input_ids=ids, attention_mask=mask, use_cache=k > 1)
    hidden = result.last_hidden_state
    rows = torch.arange(n_rows, device=device)
    main_index = torch.tensor(main, device=device)
    out[rows, main_index] = score_positions(lm, settings, hidden[:, :-1], labels).log_probs.sum(-1).float()
    if k == 1:
        return out

    # 2. the other completions, continuing from the prompt's keys and values only
    others = [[j for j in range(k) if j != m] for m in main]
    flat = [completions[b][j] for b in range(n_rows) for j in others[b]]  # row b * (K - 1) + i
    cont_ids, cont_mask = right_padded(flat, pad_id, device)
    last = hidden[rows, prompt_lengths - 1].repeat_interleave(k - 1, 0)  # [B (K-1), H]: scores the first tokens
    first_labels = cont_ids[:, :1].masked_fill(cont_mask[:, :1] == 0, -100)
    values = score_positions(lm, settings, last[:, None], first_labels).log_probs[:, 0]
    if cont_ids.size(1) > 1:
        cache = result.cache
        if k > 2:
            cache.batch_repeat_interleave(k - 1)
        prompt_only = (~scored & (mask == 1)).long().repeat_interleave(k - 1, 0)  # keys of the prompt alone
        inputs, input_mask = cont_ids[:, :-1], cont_mask[:, :-1]
        positions = prompt_lengths.repeat_interleave(k - 1)[:, None] + torch.arange(inputs.size(1), device=device)
        cont_hidden = backbone(
            input_ids=inputs,
            attention_mask=torch.cat([prompt_only, input_mask], dim=1),
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        cont_labels = cont_ids[:, 1:].masked_fill(cont_mask[:, 1:] == 0, -100)
        values = values + score_positions(lm, settings, cont_hidden, cont_labels).log_probs.sum(-1)
    other_index = torch.tensor([j for b in range(n_rows) for j in others[b]], device=device)
    out[rows.repeat_interleave(k - 1), other_index] = values.float()
    return out


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
