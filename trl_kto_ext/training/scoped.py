"""Changes scoped to a block: an attribute, a TRL log filter, activation checkpointing; restored on exit."""

from __future__ import annotations

import contextlib
import logging

from trl_kto_ext.trl_internals import KTO_TRAINER_LOGGER


@contextlib.contextmanager
def activation_checkpointing_off(model, checkpointing_kwargs: dict | None):
    """TRL's `disable_gradient_checkpointing` under transformers 5's names (the old ones warn at every step)."""
    was_enabled = bool(getattr(model, "is_activation_checkpointing", False))
    if was_enabled:
        model.activation_checkpointing_disable()
    try:
        yield
    finally:
        if was_enabled:
            model.activation_checkpointing_enable(checkpointing_kwargs)


class _TrlWeightAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "don't seem to be in an ideal range" not in record.getMessage()


@contextlib.contextmanager
def without_trl_weight_advice():
    """Drops TRL's log line on desirable/undesirable weights while the block runs."""
    trl_logger, advice = logging.getLogger(KTO_TRAINER_LOGGER), _TrlWeightAdvice()
    trl_logger.addFilter(advice)
    try:
        yield
    finally:
        trl_logger.removeFilter(advice)


@contextlib.contextmanager
def loss_type_during_setup(args, loss_type: str):
    saved = args.loss_type
    args.loss_type = loss_type
    try:
        yield
    finally:
        args.loss_type = saved


@contextlib.contextmanager
def attribute(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)
