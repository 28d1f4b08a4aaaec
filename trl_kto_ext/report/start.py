"""The lines a KTO run prints when training starts: λ_D, λ_U and their ratio, bf16 when it was left unset, and the KL
pairing when the reference log-probs are cached or the pairing is fixed over the dataset."""

from __future__ import annotations

from transformers import TrainerCallback


class StartReport(TrainerCallback):
    """Prints lambda_D, lambda_U and their ratio once, when training starts (and bf16 when it was left unset)."""

    def __init__(self, trainer):
        self._trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._trainer.loss_aversion is not None:
            print(self._trainer.loss_aversion.describe(), flush=True)
        if state.is_world_process_zero and args.bf16 and getattr(args, "bf16_from_default", False):
            slower = " (most CPUs only emulate bf16: float32 trains faster there)" if args.device.type == "cpu" else ""
            print("bf16 left unset: training in bf16 mixed precision (the default on bf16 GPUs and with use_cpu=True); "
                  f"pass bf16=False for float32{slower}.")  # fmt: skip
        line = pairing_line(args) if getattr(self._trainer, "_uses_kl", False) else None
        if state.is_world_process_zero and line:
            print(line, flush=True)


def pairing_line(args) -> str | None:
    """Which KL pairing a run uses and why, with what it costs per step; None when there is nothing to say (per-batch
    pairing without cached reference log-probs, the plain default)."""
    pairing, precompute = args.kl_pairing, args.precompute_ref_log_probs
    if pairing == "batch" and not precompute:
        return None
    why = (
        "kl_pairing unset, precompute_ref_log_probs=True" if getattr(args, "kl_pairing_from_default", False) else "set"
    )
    if pairing == "dataset" and precompute:
        return (f"KL pairing 'dataset' ({why}): one seeded pairing fixed for the run, so the KL rows' reference "
                "log-probs are cached with the targets' and a step runs no reference forward; kl_pairing='batch' "
                "draws a fresh pairing per batch at one reference pass per step.")  # fmt: skip
    if pairing == "batch":
        return ("KL pairing 'batch' (set): a fresh pairing per batch, so the KL rows' reference log-probs cannot be "
                "cached and a reference pass per step remains; leave kl_pairing unset (or 'dataset') to cache "
                "them too.")  # fmt: skip
    return ("KL pairing 'dataset' (set): one seeded pairing fixed for the run; without precompute_ref_log_probs the "
            "reference still runs on every step.")  # fmt: skip
