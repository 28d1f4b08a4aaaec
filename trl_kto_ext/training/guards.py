"""Run-time guards of KTOExtTrainer: a batch without completion tokens or a non-finite loss never trains on NaN."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback

from trl_kto_ext.errors import UserFault

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserFault, FloatingPointError):
    """Raised when a training step's loss is NaN or infinite and `on_nonfinite_loss="raise"`. A [`UserFault`]: its
    causes are the settings (learning rate, precision) its message names, so the command line prints it in one line."""


# What a micro-batch that made no update was skipped for, as its metric counts it.
SKIP_KINDS = {
    "nonfinite": "a NaN/inf loss (`skipped/nonfinite_steps`)",
    "empty": "no completion token (`skipped/empty_batches`)",
    "no_preference": "no contrast between desirable and undesirable samples (`skipped/no_preference_steps`)",
}


def count_zeroed_loss(trainer, kind: str) -> None:
    """Records a training micro-batch that makes no update (its loss replaced by 0), skipped for `kind` (a key of
    [`SKIP_KINDS`]): its 0 is left out of the logged loss ([`correct_logged_loss`]) and a run in which every
    micro-batch was skipped is reported at its end ([`no_update_message`])."""
    # Its share of its optimizer step (transformers divides each micro-batch's loss by the step's micro-batch count).
    share = 1 / max(
        1, getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
    )
    trainer._zeroed_losses = getattr(trainer, "_zeroed_losses", 0) + share
    trainer._zeroed_losses_total = getattr(trainer, "_zeroed_losses_total", 0) + share
    kinds = trainer.__dict__.setdefault("_zeroed_by_kind", {})
    kinds[kind] = kinds.get(kind, 0) + 1


def guard_loss(trainer, mode: str, batch: dict[str, Any], loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Returns the loss to back-propagate and whether to record the step's metrics.

    - A non-finite training loss (on any process) raises [`NonFiniteLossError`], or with `on_nonfinite_loss="skip"`
      is replaced by a zero loss, its gradients are discarded after the backward pass and it is counted in
      `skipped/nonfinite_steps`.
    - A batch without any completion token (on all processes) gives a zero loss and is counted in
      `skipped/empty_batches`: there is nothing to learn from, and its rewards would be meaningless.
    Both decisions are taken from values summed over processes, so every process takes the same branch.
    """
    flags = torch.stack(
        [(~torch.isfinite(loss.detach())).float().sum(), batch["completion_mask"][:, 1:].sum().float()]
    )
    if trainer.accelerator.num_processes > 1:
        flags = trainer.accelerator.reduce(flags, reduction="sum")
    nonfinite, completion_tokens = flags.tolist()
    metrics = trainer._metrics[mode]
    zero = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0  # keeps the graph; gradient exactly zero
    if nonfinite and mode == "train":
        if getattr(trainer.args, "on_nonfinite_loss", "raise") != "skip":
            raise NonFiniteLossError(nonfinite_message(trainer, loss))
        _count_nonfinite_step(trainer, loss)
        trainer._discard_step_gradients = True
        count_zeroed_loss(trainer, "nonfinite")
        metrics["skipped/nonfinite_steps"].append(1)
        logger.warning(
            "Non-finite loss (%s) at step %d: skipped (zero gradient, counted in `skipped/nonfinite_steps`) because "
            "on_nonfinite_loss='skip'.",
            loss.detach().float().item(),
            trainer.state.global_step + 1,
        )
        return zero, False
    if completion_tokens == 0:
        metrics["skipped/empty_batches"].append(1)
        if mode == "train":
            count_zeroed_loss(trainer, "empty")
        if not getattr(trainer, "_warned_empty_batch", False):
            trainer._warned_empty_batch = True
            logger.warning(
                "Step %d: every completion token of the batch is masked (completions empty or truncated away by the "
                "data collator's max_length), so the batch is skipped: zero loss and gradient, no metrics. Such "
                "batches are counted in the `skipped/empty_batches` metric (this warning is shown once).",
                trainer.state.global_step + 1,
            )
        return zero, False
    if mode == "train":
        trainer._trained_batches = getattr(trainer, "_trained_batches", 0) + 1
    return loss, True


def nonfinite_message(trainer, loss: torch.Tensor) -> str:
    value = loss.detach().float().item()
    where = f"({value})" if not math.isfinite(value) else "(on another process)"
    return (
        f"Non-finite training loss {where} at step {trainer.state.global_step + 1} "
        f"(epoch {trainer.state.epoch or 0:.2f}); training stopped before this step's update. {_diagnosis(trainer)} "
        "To skip such steps instead (zero gradient for the step, counted in `skipped/nonfinite_steps`), set "
        "on_nonfinite_loss='skip'."
    )


def _diagnosis(trainer) -> str:
    """Whether the weights are still finite, and the likely causes of a non-finite loss with this configuration."""
    args = trainer.args
    dtype = _dtype_name(trainer)
    weights_finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    weights = (
        "The model's weights are still finite, so this batch's forward pass overflowed."
        if weights_finite
        else "The model's weights already contain NaN/inf: an earlier update diverged (look at grad_norm in the steps "
        "logged before this one)."
    )
    return (
        f"{weights} Likely causes: a learning rate too high (learning_rate={args.learning_rate:g}: lower it, add "
        f"warmup, keep max_grad_norm > 0, now {args.max_grad_norm}); overflow in low precision (dtype: {dtype}; "
        f"prefer bf16 to fp16, or train in fp32); or extreme log-probabilities (beta={args.beta})."
    )


def _dtype_name(trainer) -> str:
    """The training precision: fp16/bf16 mixed precision, else the dtype of the model's weights."""
    args = trainer.args
    if args.fp16 or args.bf16:
        return "fp16 (mixed precision)" if args.fp16 else "bf16 (mixed precision)"
    dtype = next(trainer.model.parameters()).dtype
    return {torch.float16: "fp16 weights", torch.bfloat16: "bf16 weights"}.get(dtype, "fp32")


def after_training_step(trainer) -> None:
    """Called after each micro-batch's backward pass: pairing bookkeeping, then discarding of skipped gradients."""
    pending = getattr(trainer, "_pairing_pending", None)
    if pending:
        pending.popleft()  # that batch is consumed: a checkpoint now resumes after it
    if getattr(trainer.args, "on_nonfinite_loss", "raise") != "skip":
        return
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    flagged = trainer.__dict__.pop("_discard_step_gradients", False)
    if not grads:
        return  # e.g. DeepSpeed, which keeps the gradients itself
    finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    if not finite and not flagged:  # a finite loss whose gradient overflowed: clipping would turn it into NaN weights
        _count_nonfinite_step(trainer, None)
        trainer._metrics["train"]["skipped/nonfinite_steps"].append(1)
        logger.warning(
            "Non-finite gradient at step %d: skipped (zero gradient, counted in `skipped/nonfinite_steps`).",
            trainer.state.global_step + 1,
        )
    if flagged:
        # The zero loss gave this micro-batch zero or NaN gradients (NaN where its activations were not finite);
        # replacing the non-finite values keeps what earlier micro-batches of the step accumulated.
        for grad in grads:
            grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    elif not finite:  # this micro-batch's share cannot be told apart: the whole step's gradient is dropped
        for grad in grads:
            grad.zero_()


def _count_nonfinite_step(trainer, loss: torch.Tensor | None) -> None:
    """Marks the current optimizer step as non-finite; raises [`NonFiniteLossError`] when it would make
    `max_consecutive_nonfinite_steps` such steps in a row (a run that is no longer learning)."""
    limit = getattr(trainer.args, "max_consecutive_nonfinite_steps", None)
    streak = getattr(trainer, "_nonfinite_streak", 0)
    if not getattr(trainer, "_nonfinite_in_step", False):
        trainer._nonfinite_in_step = True
        streak += 1
    if limit is not None and streak >= limit:
        first = trainer.state.global_step + 2 - streak
        what = f"loss ({loss.detach().float().item()})" if loss is not None else "gradient"
        raise NonFiniteLossError(
            f"{streak} consecutive training steps (steps {first} to {trainer.state.global_step + 1}) had a "
            f"non-finite {what} and were skipped (on_nonfinite_loss='skip'), which reached "
            f"max_consecutive_nonfinite_steps={limit}: the run is no longer learning, so it stops before this step's "
            f"update. {_diagnosis(trainer)} To tolerate longer runs of skipped steps, raise "
            "max_consecutive_nonfinite_steps."
        )


class NonFiniteStreak(TrainerCallback):
    """Counts consecutive optimizer steps skipped for a NaN/inf loss or gradient (see `_count_nonfinite_step`), and
    at the end of a run in which no micro-batch was trained on, warns that the model did not change
    ([`no_update_message`], kept as `trainer.no_update_message` for the command line's exit status)."""

    def __init__(self, trainer):
        self._trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume the state is the checkpoint's: the first logging window starts there.
        trainer = self._trainer
        trainer._last_logged_train_step = state.global_step
        trainer._nonfinite_streak = 0
        trainer._zeroed_losses = trainer._zeroed_losses_total = trainer._trained_batches = 0
        trainer._zeroed_by_kind, trainer.no_update_message = {}, None

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self._trainer
        trainer.no_update_message = no_update_message(trainer)
        if trainer.no_update_message and trainer.is_world_process_zero():
            logger.warning(trainer.no_update_message)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer
        skipped = trainer.__dict__.pop("_nonfinite_in_step", False)
        trainer._nonfinite_streak = getattr(trainer, "_nonfinite_streak", 0) + 1 if skipped else 0


def no_update_message(trainer) -> str | None:
    """The warning for a training run in which every micro-batch was skipped (None when one was trained on): the
    model saved at its end equals the one it started from. The trainer's `_no_update_advice()`, when it has one,
    gives the likely fixes (online KTO's: see `trl_kto_ext/online/one_class.py`)."""
    kinds = getattr(trainer, "_zeroed_by_kind", None) or {}
    if getattr(trainer, "_trained_batches", 0) or not kinds:
        return None
    steps = trainer.state.global_step - getattr(trainer, "_initial_global_step", 0)
    why = "; ".join(f"{n} for {SKIP_KINDS.get(kind, kind)}" for kind, n in kinds.items())
    advice = trainer._no_update_advice() if hasattr(trainer, "_no_update_advice") else ""
    return (
        f"No training step of this run made an update: all {steps} steps were skipped (micro-batches skipped: {why}), "
        f"so the model saved at the end equals the model the run started from.{' ' + advice if advice else ''}"
    )


def correct_logged_loss(trainer, logs: dict[str, float]) -> None:
    """Training logs: `loss` (and the run's `train_loss`) averaged over the micro-batches that were trained on,
    instead of counting each one skipped ([`count_zeroed_loss`]: a non-finite loss, no completion token, online KTO's
    no-preference step) as a loss of 0; left out when every one was skipped.

    transformers logs `loss` = (sum of the window's step losses) / (steps in the window), each step's loss being the
    sum of its micro-batch losses / its number of micro-batches; a skipped micro-batch added 0, and counted its share
    of its step. Exact (the mean over the trained micro-batches) when the window's steps have equally many.
    """
    if "loss" in logs:
        steps = trainer.state.global_step - getattr(trainer, "_last_logged_train_step", 0)
        skipped = trainer.__dict__.pop("_zeroed_losses", 0)
        trainer._last_logged_train_step = trainer.state.global_step
        if skipped and steps > 0:
            if steps - skipped <= 1e-9:
                del logs["loss"]
            else:
                logs["loss"] = logs["loss"] * steps / (steps - skipped)
    if "train_loss" in logs:  # transformers divides by the steps of this `train` call (after a resume, not all)
        skipped = getattr(trainer, "_zeroed_losses_total", 0)
        steps = trainer.state.global_step - getattr(trainer, "_initial_global_step", 0)
        if skipped and steps > 0:
            if steps - skipped <= 1e-9:
                del logs["train_loss"]
            else:
                logs["train_loss"] = logs["train_loss"] * steps / (steps - skipped)


def corrected_train_output(output):
    """transformers' `TrainOutput` with `training_loss` = the logged `train_loss` ([`correct_logged_loss`]), NaN when
    every micro-batch was skipped (no loss to average)."""
    return output._replace(training_loss=output.metrics.get("train_loss", math.nan))
