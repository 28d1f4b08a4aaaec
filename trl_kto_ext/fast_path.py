"""The trainer's per-step log-prob passes on the fast path, checked once per model against TRL's path, else TRL's."""

from __future__ import annotations

import logging

import torch
from accelerate.utils import is_peft_model

from . import logps

logger = logging.getLogger(__name__)

_TARGET_KEYS = ("input_ids", "attention_mask", "completion_mask")
_KL_KEYS = ("KL_input_ids", "KL_attention_mask", "KL_completion_mask")


class FastPath:
    """Completion-only, length-bucketed forwards for one trainer ([`logps.completion_logps`]).

    Each causal LM (the policy's, the reference's) is checked the first time it is used: the per-sequence log-probs
    of that batch on the fast path must equal TRL's fused-head path (relative 1e-4 in fp32, 2e-2 under bf16/fp16
    autocast, where both paths round). A model that fails, or whose TRL head cannot be extended (another TRL version,
    prompt-learning PEFT, vision inputs, MoE auxiliary loss), stays on TRL's path, and the reason is logged once.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self._verdict: dict[int, bool] = {}

    # ------------------------------------------------------------------------------------------------ passes
    def policy_forward(self, model, batch, kwargs) -> object | None:
        """The policy's per-token outputs for the target rows ([B, T-1] `log_probs`, `entropy`, `mean_logits`), with
        gradients; None where the fast path does not apply (the caller runs TRL's)."""
        if self.trainer.aux_loss_enabled or not self._usable(model, batch, _TARGET_KEYS):
            return None
        extra = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
        return logps.completion_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            fields=("log_probs", "entropy", "mean_logits"),
            bucket_overhead_tokens=self._overhead(grad=True),
            **extra,
        )

    @torch.no_grad()
    def sequence_logps(self, model, batch, keys) -> torch.Tensor | None:
        """Summed completion log-probs [B] of the rows named by `keys` (target or KL), no gradient; None where the
        fast path does not apply."""
        if not self._usable(model, batch, keys):
            return None
        out = logps.completion_logps(model, *(batch[k] for k in keys), bucket_overhead_tokens=self._overhead(False))
        return out.log_probs.sum(-1)

    # ------------------------------------------------------------------------------------------------ checks
    def _overhead(self, grad: bool) -> int | None:
        t = self.trainer
        if grad and (t.accelerator.num_processes > 1 or t.is_deepspeed_enabled or t.is_fsdp_enabled):
            return None  # one forward per backward: DDP/FSDP/DeepSpeed hooks expect exactly that
        return logps.bucket_overhead(t.accelerator.device)

    def _usable(self, model, batch, keys) -> bool:
        lm = self._causal_lm(model)
        if lm is None:
            return False
        verdict = self._verdict.get(id(lm))
        if verdict is None:
            reason = self._why_not(model, lm, batch)
            if reason is None:
                reason = self._compare(model, batch, keys)
            verdict = self._verdict[id(lm)] = reason is None
            if reason is not None:
                logger.warning(
                    "Completion-only log-prob path off for %s: %s. Using TRL's path.", type(lm).__name__, reason
                )
        return verdict

    def _causal_lm(self, model):
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped

    def _why_not(self, model, lm, batch) -> str | None:
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        if getattr(self.trainer, "_is_vision_dataset", False):
            return "vision inputs"
        if is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning:
            return "prompt-learning PEFT adds virtual tokens"
        if not logps.install_completion_head(lm):
            return "no TRL fused LM head with readable settings on this model"
        return None

    def _compare(self, model, batch, keys) -> str | None:
        """None when the fast path's per-sequence log-probs on this batch equal TRL's path's."""
        ids, mask, completion = (batch[k] for k in keys)
        labels = ids.masked_fill(completion == 0, -100)
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()  # dropout would make two passes differ
        try:
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
                ref = ref.log_probs[:, -(ids.size(1) - 1) :].sum(-1).double()
                overhead = logps.bucket_overhead(self.trainer.accelerator.device)
                fast = logps.completion_logps(model, ids, mask, completion, bucket_overhead_tokens=overhead)
                fast = fast.log_probs.sum(-1).double()
        finally:
            unwrapped.train(was_training)
        tolerance = 2e-2 if (self.trainer.args.bf16 or self.trainer.args.fp16) else 1e-4
        error = ((fast - ref).abs() / ref.abs().clamp(min=1.0)).max().item()
        if not error <= tolerance:
            return f"its log-probs differ from TRL's by {error:.2e} (relative; tolerance {tolerance:g})"
        return None


def fast_path(trainer) -> FastPath:
    """The trainer's [`FastPath`], created on first use."""
    path = trainer.__dict__.get("_fast_path")
    if path is None:
        path = trainer.__dict__["_fast_path"] = FastPath(trainer)
    return path
