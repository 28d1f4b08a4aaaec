"""The lines a KTO run prints when training starts: λ_D, λ_U and their ratio, and bf16 when it was left unset."""

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
