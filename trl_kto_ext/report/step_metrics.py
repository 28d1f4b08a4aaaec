"""The KTO metrics of a training logging window or of an evaluation pass, as means over its rows.

TRL averages per-batch means (`KTOTrainer.log`: `sum(val) / len(val)` over `self._metrics`), so a batch of 1 desirable
row weighs as much as a batch of 7, and a batch holding one class gives no margin at all. Here every micro-batch adds
per-row sums and counts to running totals; a summary divides the totals of its window (training: the steps since the
last log, gradient accumulation included; evaluation: the whole pass):

- `rewards/chosen`, `logps/chosen`: sum over the window's desirable rows of beta * r (resp. log pi_theta(y|x), summed
  over completion tokens) / their number; `rewards/rejected`, `logps/rejected` likewise over the undesirable rows.
- `rewards/margins` = `rewards/chosen` - `rewards/rejected` of the window: the mean chosen reward over the desirable
  rows of the window minus the mean rejected reward over its undesirable rows (present whenever the window holds both
  classes, whatever the batches held).
- `logits/chosen`, `logits/rejected`, `entropy`: means over the completion tokens of the window (of those classes).
- `weight/desirable_mean`, `weight/undesirable_mean` (data with a `weight` column): the mean per-row weight of the
  window's rows of each class.
- `count/desirable`, `count/undesirable`: rows of the window; `kl`, `kl_raw`, `kl_rows`, `aux_loss`: means over its
  micro-batches (z0 is one estimate per batch); `skipped/*`: counts.
A window without rows of a class has no metric of that class and no margin (never NaN). Training windows hold each
process's own totals, reduced over processes once, when the window is summarised; evaluation rows are gathered per
batch with `gather_for_metrics`, which drops the rows repeated to even out the last batch across processes (as the
Trainer does for `eval_loss`), so each evaluation row counts once.
"""

from __future__ import annotations

import contextlib
import math

import torch

from trl_kto_ext.errors import UserInputError
from trl_kto_ext.training import guards

# Per-row quantities summed over a window, one column each.
_COLUMNS = (
    "n_chosen",
    "n_rejected",
    "reward_chosen",
    "reward_rejected",
    "logp_chosen",
    "logp_rejected",
    "logits_chosen",
    "tokens_chosen",
    "logits_rejected",
    "tokens_rejected",
    "entropy",
    "tokens",
    "attended",
    "weight_chosen",
    "weight_rejected",
    "weighted",  # rows that carried a per-row weight (0: no weight column, no weight metrics)
)
_TOTALS = "_row_totals"  # key of the running totals in `trainer._metrics[mode]` (cleared with the other metrics)
# Metrics a window lacks when it has no rows of a class.
NEEDS_DESIRABLE = ("rewards/chosen", "logps/chosen", "logits/chosen", "rewards/margins")
NEEDS_UNDESIRABLE = ("rewards/rejected", "logps/rejected", "logits/rejected", "rewards/margins")


def record(trainer, mode: str, batch, labels, logps, outputs, metrics) -> None:
    """Adds one micro-batch to the running totals of `mode` (see the module docstring) and its batch-level values.

    Args:
        batch: the collated batch ([B, T] `completion_mask` and `attention_mask`); labels: [B] bool, True = desirable.
        logps: the step's `SequenceLogps` ([B] policy log-probs, [K] KL rows); outputs: the policy's per-token
            `mean_logits` and `entropy` ([B, T-1]); metrics: the loss function's outputs (`rewards` [B], `kl`,
            `kl_raw`).
    """
    mask = batch["completion_mask"][:, 1:].float()
    seq_len = mask.size(1)
    rewards = metrics.rewards.detach().float()
    policy = logps.policy.detach().float()
    chosen, rejected = labels.float(), (~labels).float()
    tokens = mask.sum(-1)
    token_logits = (outputs.mean_logits[:, -seq_len:].detach().float() * mask).sum(-1)
    entropy = (outputs.entropy[:, -seq_len:].detach().float() * mask).sum(-1)
    per_row = torch.stack(
        [
            chosen,
            rejected,
            rewards * chosen,
            rewards * rejected,
            policy * chosen,
            policy * rejected,
            token_logits * chosen,
            tokens * chosen,
            token_logits * rejected,
            tokens * rejected,
            entropy,
            tokens,
            batch["attention_mask"].sum(-1).float(),
            *_weight_columns(batch, chosen, rejected),
        ],
        dim=1,
    )  # [B, len(_COLUMNS)]
    if mode == "eval":  # every process gets the pass's rows, each counted once
        per_row = trainer.accelerator.gather_for_metrics(per_row)
    m = trainer._metrics[mode]
    totals = m[_TOTALS]
    batch_sums = per_row.to(_total_dtype(per_row.device)).sum(0)
    if totals:
        totals[0] += batch_sums
    else:
        totals.append(batch_sums)
    m["kl"].append(metrics.kl.item())
    if trainer.calculate_KL:
        m["kl_raw"].append(metrics.kl_raw.item())
        m["kl_rows"].append(logps.kl_policy.numel())


def _weight_columns(batch, chosen, rejected) -> list[torch.Tensor]:
    """Per-row weight of each class and whether the row carried one (zeros without a `weight` key)."""
    weight = batch.get("weight")
    if weight is None:
        return [torch.zeros_like(chosen)] * 3
    weight = weight.detach().float().to(chosen.device)
    return [weight * chosen, weight * rejected, torch.ones_like(chosen)]


def summarize(trainer, mode: str) -> dict[str, float]:
    """The metrics collected since the last summary of `mode`, which are then cleared (see the module docstring):
    `rewards/chosen` = sum of beta * r over the window's desirable rows / their number (`rewards/rejected` likewise
    over its undesirable rows) and `rewards/margins` = `rewards/chosen` - `rewards/rejected`, present only when the
    window holds both classes.

    Training: called on every process (as `Trainer.log` is), since the window's totals are reduced over processes here.
    """
    m = trainer._metrics[mode]
    totals = m.pop(_TOTALS, None)
    metrics = {
        key: (sum(values) if key.startswith(("count/", "skipped/")) else sum(values) / len(values))
        for key, values in m.items()
        if values
    }
    m.clear()
    if mode == "train" and trainer.accelerator.num_processes > 1:
        device = trainer.accelerator.device
        local = totals[0] if totals else torch.zeros(len(_COLUMNS), dtype=_total_dtype(device), device=device)
        totals = [trainer.accelerator.reduce(local, reduction="sum")]
    if totals:
        sums = dict(zip(_COLUMNS, totals[0].tolist()))
        metrics.update(_row_means(sums))
        if mode == "train":
            trainer._total_train_tokens += int(sums["attended"]) // trainer._tp_size
        metrics["num_tokens"] = trainer._total_train_tokens
    if trainer.loss_aversion is not None:
        metrics["lambda_D"] = trainer.desirable_weight
        metrics["lambda_U"] = trainer.undesirable_weight
        if not math.isnan(trainer.loss_aversion.ratio):  # undefined with one class: left out, not NaN
            metrics["loss_aversion_ratio"] = trainer.loss_aversion.ratio
    return metrics


def count_tokens(trainer) -> None:
    """Adds the tokens of the training window not yet logged to the cumulative `num_tokens` (reduced over processes),
    so that a checkpoint saved between two logs holds every token trained on. Called on every process."""
    totals = trainer._metrics["train"].get(_TOTALS)
    attended = _COLUMNS.index("attended")
    device = trainer.accelerator.device
    pending = totals[0][attended] if totals else torch.zeros((), dtype=_total_dtype(device), device=device)
    if trainer.accelerator.num_processes > 1:
        pending = trainer.accelerator.reduce(pending.clone(), reduction="sum")
    trainer._total_train_tokens += int(pending.item()) // trainer._tp_size
    if totals:
        totals[0][attended] = 0.0


def _total_dtype(device: torch.device) -> torch.dtype:
    # float64 where the device has it: token counts of a long window stay exact beyond float32's 2**24.
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def _row_means(s: dict[str, float]) -> dict[str, float]:
    n_chosen, n_rejected = s["n_chosen"], s["n_rejected"]
    if n_chosen == 0 and n_rejected == 0:
        return {}  # no recorded rows (e.g. reduced totals of a window whose batches were all skipped)
    out = {"count/desirable": n_chosen, "count/undesirable": n_rejected}
    if s["tokens"] > 0:
        out["entropy"] = s["entropy"] / s["tokens"]
    if n_chosen > 0:
        out["rewards/chosen"] = s["reward_chosen"] / n_chosen
        out["logps/chosen"] = s["logp_chosen"] / n_chosen
    if n_rejected > 0:
        out["rewards/rejected"] = s["reward_rejected"] / n_rejected
        out["logps/rejected"] = s["logp_rejected"] / n_rejected
    if n_chosen > 0 and n_rejected > 0:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if s["tokens_chosen"] > 0:
        out["logits/chosen"] = s["logits_chosen"] / s["tokens_chosen"]
    if s["tokens_rejected"] > 0:
        out["logits/rejected"] = s["logits_rejected"] / s["tokens_rejected"]
    if s["weighted"] > 0 and n_chosen > 0:
        out["weight/desirable_mean"] = s["weight_chosen"] / n_chosen
    if s["weighted"] > 0 and n_rejected > 0:
        out["weight/undesirable_mean"] = s["weight_rejected"] / n_rejected
    return out


def add_train_window(trainer, logs: dict[str, float]) -> None:
    """`log` of a training call: the loss corrected for skipped steps and the window's KTO metrics added to `logs`.
    An evaluation's metrics are already in its `logs`, under its own prefix (see [`pass_metrics`]): nothing to add."""
    if trainer._evaluating:
        return
    guards.correct_logged_loss(trainer, logs)  # steps skipped for a NaN/inf loss are not a loss of 0
    logs.update(summarize(trainer, "train"))


@contextlib.contextmanager
def eval_pass(trainer):
    """Clears the evaluation totals before a pass (nothing carried over from an interrupted one) and after it."""
    trainer._metrics["eval"].clear()
    try:
        yield
    finally:
        trainer._metrics["eval"].clear()


def pass_metrics(trainer, prefix: str) -> dict[str, float]:
    """The KTO metrics of the evaluation pass that just ended, as `{prefix}_{name}`.

    A pass that saw one class only reports that class's metrics and no `rewards/margins`. During training, when that
    leaves out the metric named by `metric_for_best_model`, a ValueError names the missing class and the fix (instead
    of transformers' KeyError at the comparison); [`check_best_metric`] catches map-style eval sets at start.
    """
    metrics = {f"{prefix}_{k}": v for k, v in summarize(trainer, "eval").items()}
    wanted = _best_metric_key(trainer.args)
    if trainer.is_in_train and wanted is not None and wanted.startswith(f"{prefix}_") and wanted not in metrics:
        name = wanted[len(prefix) + 1 :]
        n_d, n_u = metrics.get(f"{prefix}_count/desirable", 0), metrics.get(f"{prefix}_count/undesirable", 0)
        if name in NEEDS_DESIRABLE + NEEDS_UNDESIRABLE:
            raise UserInputError(_one_class_message(wanted, name, int(n_d), int(n_u), "this evaluation pass"))
    return metrics


def check_best_metric(trainer) -> None:
    """At start: `metric_for_best_model` names a metric its eval set cannot have (a map-style set of one class, after
    rows dropped for `max_length`) -> ValueError with the fix. Streamed eval sets are checked per pass."""
    wanted, sets = _best_metric_key(trainer.args), trainer.eval_dataset
    evaluates = str(getattr(trainer.args.eval_strategy, "value", trainer.args.eval_strategy)) != "no"
    if wanted is None or sets is None or not evaluates:  # transformers reads it after the evaluations of training
        return
    for prefix, dataset in sets.items() if isinstance(sets, dict) else [(None, sets)]:
        prefix = "eval" if prefix is None else f"eval_{prefix}"
        columns = getattr(dataset, "column_names", None) or []
        if not wanted.startswith(f"{prefix}_") or "label" not in columns or not hasattr(dataset, "__len__"):
            continue
        name = wanted[len(prefix) + 1 :]
        n_d = sum(bool(v) for v in dataset["label"])
        n_u = len(dataset) - n_d
        if (n_d == 0 and name in NEEDS_DESIRABLE) or (n_u == 0 and name in NEEDS_UNDESIRABLE):
            raise ValueError(_one_class_message(wanted, name, n_d, n_u, "the eval set"))


def _best_metric_key(args) -> str | None:
    name = getattr(args, "metric_for_best_model", None)
    if name is None:
        return None
    return name if name.startswith("eval_") else f"eval_{name}"  # as transformers looks it up


def _one_class_message(wanted: str, name: str, n_d: int, n_u: int, where: str) -> str:
    missing = "desirable" if n_d == 0 else "undesirable"
    other = "'rewards/rejected' with greater_is_better=False" if n_d == 0 else "'rewards/chosen'"
    return (
        f"metric_for_best_model={wanted!r} is undefined here: {where} has no {missing} rows ({n_d} desirable, {n_u} "
        f"undesirable), so it reports no {name!r}. Give an eval set with both labels, or pick a metric it has "
        f"(e.g. 'loss', or {other})."
    )
