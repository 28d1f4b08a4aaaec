"""The numeric settings of the package's configs (TrainingArguments', KTOConfig's, ours and online KTO's), each
checked for NaN, infinity, sign, range and whole-number-ness, so a bad number stops at construction with one line
naming the field, the value and what is allowed, instead of a torch traceback at the first step (or a silent
fallback, e.g. `max_steps=0` training `num_train_epochs` or a negative `max_grad_norm` turning clipping off)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple


class Rule(NamedTuple):
    """What a numeric field may hold: `allowed(value)` for a value that is not None, `what` in words."""

    allowed: Callable[[float], bool]
    what: str
    integer: bool = False
    optional: bool = False  # None is allowed (the field's "unset")
    hint: str = ""


def _positive(x):
    return x > 0


def _non_negative(x):
    return x >= 0


def _fraction(x):
    return 0 <= x < 1


POSITIVE_INT = Rule(_positive, "a whole number >= 1", integer=True)
NON_NEGATIVE_INT = Rule(_non_negative, "a whole number >= 0", integer=True)
POSITIVE = Rule(_positive, "a positive finite number")
NON_NEGATIVE = Rule(_non_negative, "a finite number >= 0")
SEED = Rule(lambda x: 0 <= x < 2**32, "a whole number in [0, 2**32)", integer=True)


def _optional(rule: Rule, hint: str = "") -> Rule:
    return rule._replace(optional=True, hint=hint or rule.hint)


def _hint(rule: Rule, hint: str) -> Rule:
    return rule._replace(hint=hint)


# Fields not listed keep the checks of their own class (e.g. TrainingArguments' `torch_empty_cache_steps`).
NUMBER_RULES: dict[str, Rule] = {
    # --- optimisation (TrainingArguments)
    "learning_rate": _hint(POSITIVE, "It is the optimizer's step size (TRL's KTO default: 1e-06)."),
    "per_device_train_batch_size": POSITIVE_INT,
    "per_device_eval_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT,
    "eval_accumulation_steps": _optional(POSITIVE_INT),
    "max_steps": Rule(
        lambda x: x == -1 or x > 0,
        "a whole number >= 1, or -1",
        integer=True,
        hint="-1 (the default) trains for num_train_epochs instead.",
    ),
    "num_train_epochs": NON_NEGATIVE,
    "warmup_steps": _hint(NON_NEGATIVE, "A value below 1 is a fraction of the training steps."),
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": Rule(_fraction, "a number in [0, 1)"),
    "adam_beta2": Rule(_fraction, "a number in [0, 1)"),
    "adam_epsilon": NON_NEGATIVE,
    "max_grad_norm": _optional(NON_NEGATIVE, "0 turns gradient clipping off."),
    "label_smoothing_factor": Rule(_fraction, "a number in [0, 1)"),
    "neftune_noise_alpha": _optional(NON_NEGATIVE),
    # --- logging, evaluation, saving
    "logging_steps": _hint(POSITIVE, "A value below 1 is a fraction of the training steps."),
    "eval_steps": _optional(NON_NEGATIVE, "A value below 1 is a fraction of the training steps; 0: logging_steps."),
    "save_steps": _hint(POSITIVE, "A value below 1 is a fraction of the training steps."),
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": _optional(POSITIVE_INT, "Leave it unset to keep every checkpoint."),
    # --- data loading and processes
    "seed": SEED,
    "data_seed": _optional(SEED),
    "dataloader_num_workers": NON_NEGATIVE_INT,
    "dataloader_prefetch_factor": _optional(POSITIVE_INT),
    "dataset_num_proc": _optional(POSITIVE_INT),
    "ddp_timeout": _hint(POSITIVE_INT, "It is in seconds."),
    # --- KTO (trl.KTOConfig)
    "beta": _hint(POSITIVE, "It scales the implied reward inside the sigmoid (the paper's default: 0.1)."),
    "desirable_weight": POSITIVE,
    "undesirable_weight": POSITIVE,
    "max_length": _optional(POSITIVE_INT, "It counts the tokens of prompt and completion together."),
    "precompute_ref_batch_size": _optional(POSITIVE_INT),
    "router_aux_loss_coef": _optional(NON_NEGATIVE),
    "ref_model_mixup_alpha": Rule(lambda x: 0 <= x <= 1, "a number in [0, 1]"),
    "ref_model_sync_steps": POSITIVE_INT,
    # --- KTOExtConfig
    "loss_aversion_stream_rows": _hint(POSITIVE_INT, "It is the number of a stream's first rows counted."),
    "kl_pairing_seed": _optional(SEED, "Leave it unset to use `seed`."),
    "kl_subset_size": _optional(POSITIVE_INT, "It is a number of KL rows per batch; unset: all of them."),
    "max_consecutive_nonfinite_steps": Rule(
        _positive,
        "a whole number of steps >= 1",
        integer=True,
        hint="It is how many optimizer steps in a row may be skipped for a NaN/inf loss before the run stops.",
    ),
    # --- OnlineKTOConfig (num_generations: its own check, in OnlineKTOConfig)
    "max_completion_length": _hint(POSITIVE_INT, "It is the number of generated tokens per completion."),
    "temperature": POSITIVE,
    "top_p": Rule(lambda x: 0 < x <= 1, "a number in (0, 1]", hint="1.0 turns nucleus sampling off."),
    "top_k": _hint(NON_NEGATIVE_INT, "0 turns top-k sampling off."),
    "desirable_threshold": Rule(lambda x: True, "a finite number"),
    "loss_aversion_window": _hint(POSITIVE_INT, "It is a number of steps."),
}


def number_problem(name: str, value: Any, rule: Rule) -> str | None:
    """The one-line message for `value` of field `name` breaking `rule`; None when it is allowed."""
    if value is None and rule.optional:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and rule.integer:
        ok = isinstance(value, int)
    if ok:
        ok = math.isfinite(value) and rule.allowed(value)
    if ok:
        return None
    unset = " (or unset)" if rule.optional else ""
    hint = f" {rule.hint}" if rule.hint else ""
    return f"`{name}` must be {rule.what}{unset}, got {value!r}.{hint}"


def check_numbers(config) -> None:
    """ValueError naming the first numeric field of `config` outside its allowed values ([`NUMBER_RULES`]).

    Also: `num_train_epochs` must be positive when `max_steps` does not set the length of training."""
    for name, rule in NUMBER_RULES.items():
        if hasattr(config, name):
            problem = number_problem(name, getattr(config, name), rule)
            if problem:
                raise ValueError(problem)
    max_steps, epochs = getattr(config, "max_steps", 1), getattr(config, "num_train_epochs", 1)
    if max_steps <= 0 and epochs <= 0:
        raise ValueError(
            f"`num_train_epochs` = {epochs} with max_steps unset (-1) trains nothing: set num_train_epochs above 0 "
            "or max_steps to a number of optimizer steps."
        )
    items = getattr(config, "reward_weights", None)
    for weight in items or ():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"`reward_weights` must be finite numbers, got {items!r}.")
