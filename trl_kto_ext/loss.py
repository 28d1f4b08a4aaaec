"""The KTO loss as a pure function of per-sequence log-probabilities (no model, no devices, no collectives)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class KTOLossMetrics(NamedTuple):
    """Detached by-products of the loss, for logging.

    Attributes:
        kl: z0 after the clamp, scalar.
        kl_raw: z0 before the clamp, scalar (negative values show the estimate being clipped).
        rewards: implied rewards beta * r(x, y), shape [B].
        losses: per-example weighted losses lambda_y * (1 - sigma(...)), shape [B].
    """

    kl: torch.Tensor
    kl_raw: torch.Tensor
    rewards: torch.Tensor
    losses: torch.Tensor


class KTOLossOutput(NamedTuple):
    """`(loss, metrics)`: the scalar loss to back-propagate and its [`KTOLossMetrics`]."""

    loss: torch.Tensor
    metrics: KTOLossMetrics


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_reference_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    weight_total: torch.Tensor | float | None = None,
) -> KTOLossOutput:
    r"""KTO loss of Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization"
    (https://arxiv.org/abs/2402.01306), Eq. (7)-(8).

    With r = log pi_theta(y|x) - log pi_ref(y|x) summed over the completion tokens and
    z0 = max(0, mean_j [log pi_theta(y'_j|x_j) - log pi_ref(y'_j|x_j)]) over mismatched pairs (detached):

        desirable:    L = lambda_D * (1 - sigma(beta * (r - z0)))
        undesirable:  L = lambda_U * (1 - sigma(beta * (z0 - r)))
        loss = mean over the batch of L          (no `weights`)
        loss = sum_i w_i L_i / sum_i w_i          (per-row `weights` w_i >= 0; z0 is unchanged)

    Args:
        policy_logps: log pi_theta(y|x) summed over completion tokens, shape [B].
        reference_logps: log pi_ref(y|x), shape [B].
        kl_policy_logps: log pi_theta(y'|x) on the mismatched KL rows, shape [K] (K may differ from B; K = 0 gives
            z0 = 0, as for a loss without a reference point).
        kl_reference_logps: log pi_ref(y'|x) on the KL rows, shape [K].
        labels: bool, True for desirable, shape [B].
        beta: the KTO temperature beta.
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.
        reference_point: optional z0 *before* the clamp, shape [] (for example the mean over all processes of a
            distributed run); when given, `kl_policy_logps` / `kl_reference_logps` are not used to compute it.
        weights: optional per-row weights w_i >= 0, shape [B] (a dataset's `weight` column). Each row's loss term is
            scaled by w_i and the sum divided by sum_i w_i, so weights that are all equal give the plain mean.
        weight_total: the denominator to use instead of this batch's sum_i w_i, e.g. the sum over all processes
            divided by their number (see `KTOExtTrainer`): averaging the per-process losses (and so their gradients,
            as DDP does) then gives the weighted mean over the global batch. A total of 0 (every row weighs 0) gives a
            loss of 0 with zero gradient.

    Returns:
        [`KTOLossOutput`] `(loss, metrics)`; `loss` is a scalar with gradients w.r.t. `policy_logps` only.
    """
    if policy_logps.ndim != 1 or policy_logps.shape != reference_logps.shape or labels.shape != policy_logps.shape:
        raise ValueError(
            "kto_loss expects policy_logps, reference_logps and labels of the same shape [B]; got "
            f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)} and {tuple(labels.shape)}."
        )
    if policy_logps.numel() == 0:
        raise ValueError("kto_loss got an empty batch (B = 0): there is nothing to compute a loss on.")
    labels = labels.to(device=policy_logps.device, dtype=torch.bool)

    if reference_point is not None:
        kl_raw = reference_point.detach().to(policy_logps)
    elif kl_policy_logps.numel() > 0:
        kl_raw = (kl_policy_logps - kl_reference_logps).mean().detach().to(policy_logps)
    else:
        kl_raw = policy_logps.new_zeros(())
    kl = kl_raw.clamp(min=0)

    logratios = policy_logps - reference_logps
    # One expression for both classes keeps a one-class batch free of empty-tensor means (and of NaN).
    sign = torch.where(labels, 1.0, -1.0).to(logratios)
    lambdas = _class_weights(labels, desirable_weight, undesirable_weight, logratios)
    losses = lambdas * (1.0 - F.sigmoid(beta * sign * (logratios - kl)))
    metrics = KTOLossMetrics(kl=kl, kl_raw=kl_raw, rewards=(beta * logratios).detach(), losses=losses.detach())
    return KTOLossOutput(_reduce(losses, weights, weight_total), metrics)


def apo_zero_unpaired_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weights: torch.Tensor | None = None,
    weight_total: torch.Tensor | float | None = None,
) -> KTOLossOutput:
    r"""Unpaired APO-zero loss (D'Oosterlinck et al., https://arxiv.org/abs/2408.06266, Eq. 7), kept for parity
    with TRL's `loss_type="apo_zero_unpaired"`:

        desirable:    L = lambda_D * (1 - sigma(beta * r))
        undesirable:  L = lambda_U * sigma(beta * r)

    Shapes, `weights` and `weight_total` as in [`kto_loss`]; there is no reference point, so `kl` and `kl_raw` are 0.
    """
    labels = labels.to(device=policy_logps.device, dtype=torch.bool)
    logratios = policy_logps - reference_logps
    lambdas = _class_weights(labels, desirable_weight, undesirable_weight, logratios)
    losses = lambdas * torch.where(labels, 1.0 - F.sigmoid(beta * logratios), F.sigmoid(beta * logratios))
    zero = policy_logps.new_zeros(())
    metrics = KTOLossMetrics(kl=zero, kl_raw=zero, rewards=(beta * logratios).detach(), losses=losses.detach())
    return KTOLossOutput(_reduce(losses, weights, weight_total), metrics)


def _reduce(losses: torch.Tensor, weights: torch.Tensor | None, weight_total) -> torch.Tensor:
    """The plain mean of the per-row losses [B], or sum_i w_i L_i / total (total: sum_i w_i unless given)."""
    if weights is None:
        return losses.mean()
    if weights.shape != losses.shape:
        raise ValueError(
            f"kto_loss expects `weights` of shape {tuple(losses.shape)} (one per row), got {tuple(weights.shape)}."
        )
    weights = weights.detach().to(losses)
    total = weights.sum() if weight_total is None else torch.as_tensor(weight_total).detach().to(losses)
    # A batch whose rows all weigh 0 contributes nothing (0, zero gradient) rather than 0 / 0.
    return (weights * losses).sum() / torch.where(total > 0, total, torch.ones_like(total))


def _class_weights(labels: torch.Tensor, desirable: float, undesirable: float, like: torch.Tensor) -> torch.Tensor:
    # Built in the dtype of the log-ratios: a float32 detour would round lambda in a float64 computation.
    return torch.where(labels, like.new_tensor(float(desirable)), like.new_tensor(float(undesirable)))
