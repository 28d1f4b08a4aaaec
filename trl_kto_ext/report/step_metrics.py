"""The KTO metrics of each step (rewards, log-probs, counts, z0, entropy), summed over processes, and their summary."""

from __future__ import annotations

import torch


def record(trainer, mode: str, batch, labels, logps, outputs, metrics) -> None:
    """Appends this step's metrics to `trainer._metrics[mode]`, summed over processes with a single collective.

    Args:
        batch: the collated batch ([B, T] `completion_mask` and `attention_mask`); labels: [B] bool, True = desirable.
        logps: the step's `SequenceLogps` ([B] policy log-probs, [K] KL rows); outputs: the policy's per-token
            `mean_logits` and `entropy` ([B, T-1]); metrics: the loss function's outputs (`rewards` [B], `kl`,
            `kl_raw`).
    """
    mask = batch["completion_mask"][:, 1:].float()
    seq_len = mask.size(1)
    rewards = metrics.rewards.float()
    policy = logps.policy.detach().float()
    chosen, rejected = labels.float(), (~labels).float()
    token_logits = outputs.mean_logits[:, -seq_len:].detach().float() * mask
    entropy = outputs.entropy[:, -seq_len:].detach().float() * mask
    sums = torch.stack(
        [
            chosen.sum(),
            rejected.sum(),
            (rewards * chosen).sum(),
            (rewards * rejected).sum(),
            (policy * chosen).sum(),
            (policy * rejected).sum(),
            entropy.sum(),
            mask.sum(),
            (token_logits.sum(-1) * chosen).sum(),
            (mask.sum(-1) * chosen).sum(),
            (token_logits.sum(-1) * rejected).sum(),
            (mask.sum(-1) * rejected).sum(),
            batch["attention_mask"].sum().float(),
            *_weight_sums(batch, chosen, rejected),
        ]
    )
    sums = trainer.accelerator.gather_for_metrics(sums.unsqueeze(0)).sum(0).tolist()
    n_chosen, n_rejected, r_chosen, r_rejected, lp_chosen, lp_rejected = sums[:6]
    entropy_sum, tokens, logit_chosen, tok_chosen, logit_rejected, tok_rejected, attended = sums[6:13]
    m = trainer._metrics[mode]
    m["kl"].append(metrics.kl.item())
    if trainer.calculate_KL:
        m["kl_raw"].append(metrics.kl_raw.item())
        m["kl_rows"].append(logps.kl_policy.numel())
    m["count/desirable"].append(n_chosen)
    m["count/undesirable"].append(n_rejected)
    if tokens > 0:
        m["entropy"].append(entropy_sum / tokens)
    # A metric with no rows in this step is left out rather than logged as NaN.
    if n_chosen > 0:
        m["rewards/chosen"].append(r_chosen / n_chosen)
        m["logps/chosen"].append(lp_chosen / n_chosen)
    if n_rejected > 0:
        m["rewards/rejected"].append(r_rejected / n_rejected)
        m["logps/rejected"].append(lp_rejected / n_rejected)
    if n_chosen > 0 and n_rejected > 0:
        m["rewards/margins"].append(r_chosen / n_chosen - r_rejected / n_rejected)
    if "weight" in batch:  # the per-row weights' mean per class (rows of the class in this step)
        if n_chosen > 0:
            m["weight/desirable_mean"].append(sums[13] / n_chosen)
        if n_rejected > 0:
            m["weight/undesirable_mean"].append(sums[14] / n_rejected)
    if tok_chosen > 0:
        m["logits/chosen"].append(logit_chosen / tok_chosen)
    if tok_rejected > 0:
        m["logits/rejected"].append(logit_rejected / tok_rejected)
    if mode == "train":
        trainer._total_train_tokens += int(attended) // trainer._tp_size
    m["num_tokens"] = [trainer._total_train_tokens]


def _weight_sums(batch, chosen, rejected) -> list:
    """The summed per-row weight of each class ([] without a `weight` key: every process sees the same keys)."""
    weight = batch.get("weight")
    if weight is None:
        return []
    weight = weight.float().to(chosen.device)
    return [(weight * chosen).sum(), (weight * rejected).sum()]


def summarize(trainer, mode: str) -> dict[str, float]:
    """The metrics collected since the last summary of `mode`, which are then cleared. Row counts and skipped
    steps add up; every other metric is averaged over the steps (batches) that recorded it."""
    metrics = {
        key: (sum(values) if key.startswith(("count/", "skipped/")) else sum(values) / len(values))
        for key, values in trainer._metrics[mode].items()
        if values
    }
    trainer._metrics[mode].clear()
    if trainer.loss_aversion is not None:
        metrics["lambda_D"] = trainer.desirable_weight
        metrics["lambda_U"] = trainer.undesirable_weight
        metrics["loss_aversion_ratio"] = trainer.loss_aversion.ratio
    return metrics
