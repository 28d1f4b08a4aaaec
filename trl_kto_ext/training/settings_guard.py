"""Settings a KTO trainer reads once, when it is built: set on `trainer.args` afterwards, `train()` refuses to start
rather than train with the old value (TRL's trainer keeps the old value silently)."""

from __future__ import annotations

import copy

# Copied into the trainer, its collator or its accelerator by the constructor (TRL's and ours), never read again.
READ_WHEN_BUILT = (
    "beta",
    "loss_type",
    "desirable_weight",
    "undesirable_weight",
    "loss_aversion",
    "loss_aversion_target",
    "loss_aversion_stream_rows",
    "precompute_ref_log_probs",
    "max_length",
    "pad_to_multiple_of",
    "kl_pairing",
    "kl_pairing_seed",
    "bf16",
    "fp16",
    "use_cpu",
    "disable_dropout",
)


class SettingsReadWhenBuilt:
    """Remembers the [`READ_WHEN_BUILT`] fields of `args` as the trainer was built; `check` (called first thing in
    `train()`, before the optimizer or the dataloader exist) raises ValueError naming each one changed since, its old
    and new value, and the fix."""

    def __init__(self, args):
        self._built = {name: copy.copy(getattr(args, name)) for name in READ_WHEN_BUILT if hasattr(args, name)}

    def check(self, args) -> None:
        changed = [f"`{k}` ({v!r} -> {getattr(args, k)!r})" for k, v in self._built.items() if getattr(args, k) != v]
        if changed:
            raise ValueError(
                f"{', '.join(changed)} set on the trainer's args after the trainer was built; the trainer read "
                f"{'it' if len(changed) == 1 else 'them'} when it was built. Set the value on the config before "
                "building the trainer (or build a new trainer)."
            )
