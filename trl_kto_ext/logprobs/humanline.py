"""Humanline KTO: per-token log-ratios log(pi_theta / pi_ref) clamped to [epsilon_P, epsilon_R] before they are summed.

Liu, Muennighoff and Ethayarajh, "Humanline: Online Alignment as Perceptual Loss" (arXiv 2509.24207), make offline
alignment behave like online alignment with two changes: (1) clip each token's log-ratio to [log epsilon_P,
log epsilon_R] (the authors' defaults -1.0 and 1.5), and (2) sync the reference to the policy every few steps
(here TRL's `sync_ref_model` / `ref_model_sync_steps` with mix-up 1.0, through TRL's `SyncRefModelCallback`).

The gradient follows the authors' reference code (ContextualAI/HALOs, `train/trainers.py`): there a token outside the
perceptual range keeps its log-ratio as a constant (`torch.where(mask, logratio.detach(), logratio)` in
`get_sequence_rewards` of the humanline version), and the clamped version bounds the value with `torch.clamp`, whose
gradient is 0 outside the bounds. So a clamped token adds its bound to r and no gradient; a token inside the bounds
adds its log-ratio with its gradient. z0 is estimated from the KL rows' log-ratios clamped the same way (detached, as
always). The share of target completion tokens inside the bounds is logged as `humanline/unclamped`.
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model

from trl_kto_ext.errors import UserInputError
from trl_kto_ext.logprobs.fast_path import KL_KEYS, TARGET_KEYS, fast_path


def clamp_token_logratios(
    policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence sums of clamped per-token log-ratios.

    Args:
        policy, reference: per-token log-probs [B, T] (nats); gradients flow through `policy` only.
        mask: [B, T], 1 on the completion tokens counted.
        low, high: the bounds epsilon_P <= 0 <= epsilon_R of each token's log(pi_theta / pi_ref).

    Returns:
        (sum over the masked tokens of clamp(policy - reference, low, high) [B], the number of masked tokens inside
        [low, high] (a scalar), the number of masked tokens). A token outside the bounds adds its bound and no
        gradient (`torch.clamp`).
    """
    mask = mask.to(policy.dtype)
    ratio = policy - reference.detach().to(policy.dtype)
    summed = (ratio.clamp(min=low, max=high) * mask).sum(-1)
    inside = (((ratio >= low) & (ratio <= high)).to(policy.dtype) * mask).sum().detach()
    return summed, inside, mask.sum()


def token_logps(trainer, model, batch, keys) -> torch.Tensor:
    """Per-token completion log-probs [B, T-1] of the text rows named by `keys` (target or KL), zero outside the
    completion: the fast path, else TRL's fused head. Gradients as the caller's grad mode allows."""
    fast = fast_path(trainer).token_logps(model, batch, keys) if not torch.is_grad_enabled() else None
    if fast is not None:
        return fast
    ids, attention, completion = (batch[k] for k in keys)
    labels = ids.masked_fill(completion == 0, -100)
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False)
    return out.log_probs[:, -(ids.size(1) - 1) :]


def clamped_logps(trainer, model, batch, outputs) -> tuple[torch.Tensor, ...]:
    """(policy [B], reference [B], kl_policy [K], kl_reference [K]) for the loss, with policy - reference and
    kl_policy - kl_reference equal to the clamped sums of [`clamp_token_logratios`]: `policy` and `kl_policy` keep
    the true summed log-probs as values (so `logps/*` metrics keep their meaning), the gradient of `policy` is the
    clamped sum's, and the references absorb the difference. Records `humanline/unclamped` (summed over processes).

    Raises:
        ValueError: rows with inputs other than text (images): the per-token reference runs on text rows only.
    """
    if not trainer._only_text(batch):
        raise UserInputError(
            "humanline=True supports text rows only (this batch has other model inputs, e.g. images)."
        )
    args = trainer.args
    low, high = args.humanline_log_epsilon_P, args.humanline_log_epsilon_R
    width = batch["input_ids"].size(1) - 1
    policy_tokens = outputs.log_probs[:, -width:]
    with trainer._reference() as ref:
        reference_tokens = token_logps(trainer, ref, batch, TARGET_KEYS)
        kl_reference_tokens = token_logps(trainer, ref, batch, KL_KEYS) if trainer.calculate_KL else None
    mask = batch["completion_mask"][:, 1:]
    clamped, inside, tokens = clamp_token_logratios(policy_tokens, reference_tokens, mask, low, high)
    true_policy = (policy_tokens * mask).sum(-1).detach()
    policy = true_policy + (clamped - clamped.detach())  # value: the true log-prob; gradient: the clamped sum's
    reference = true_policy - clamped.detach()
    kl_policy = kl_reference = true_policy[:0]  # no KL rows: z0 = 0
    if trainer.calculate_KL:
        with torch.no_grad():
            kl_tokens = token_logps(trainer, model, batch, KL_KEYS)
        kl_clamped, _, _ = clamp_token_logratios(kl_tokens, kl_reference_tokens, batch["KL_completion_mask"][:, 1:],
                                                 low, high)  # fmt: skip
        kl_policy = (kl_tokens * batch["KL_completion_mask"][:, 1:]).sum(-1)
        kl_reference = kl_policy - kl_clamped
    counts = trainer.accelerator.gather_for_metrics(torch.stack([inside, tokens]).float().unsqueeze(0)).sum(0)
    if counts[1] > 0:
        trainer._metrics["train" if trainer.model.training else "eval"]["humanline/unclamped"].append(
            (counts[0] / counts[1]).item()
        )
    return policy, reference, kl_policy, kl_reference


def check_setup(model, args, peft_config) -> None:
    """Refuses reference syncing with LoRA before any weights load, naming what works instead.

    With LoRA the reference is the base model with the adapters off; syncing it to the policy would mean merging the
    adapters into the base weights and restarting them every few steps (inexact on a quantized base, and the
    optimizer's adapter state would refer to weights that no longer exist). Humanline's clamp alone works with LoRA.
    """
    is_lora = peft_config is not None or (not isinstance(model, str) and is_peft_model(model))  # a str: a model path
    if not getattr(args, "sync_ref_model", False) or not is_lora:
        return
    why = "humanline=True syncs" if getattr(args, "humanline", False) else "sync_ref_model=True syncs"
    raise ValueError(
        f"{why} the reference to the policy every ref_model_sync_steps steps, but with LoRA the reference is the base "
        "model with the adapters off, and syncing would mean merging the adapters into the base weights each time "
        "(not supported). Set sync_ref_model=False to train humanline's per-token clamp against the base model, or "
        "train without LoRA to sync the reference."
    )
