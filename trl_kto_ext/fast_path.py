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
    prompt-learning PEFT, vision inputs; for the policy's forward also an MoE auxiliary loss), stays on TRL's path,
    and the reason is logged once per trainer (info). Models that accelerate prepared for mixed precision (bf16/fp16
    autocast) keep the fast path: its calls run under the trainer's `accelerator.autocast()` with outputs cast to
    fp32, as TRL's calls do inside accelerate's forward wrapper.

    With `pack_no_grad_passes`, the no-gradient passes run padding-free ([`logps.packed_completion_logps`]) on the
    models where a first check shows it exact: the batch's rows packed into rows of twice the widest row (so that
    sequences share packs; a single row is doubled) must give TRL's per-sequence log-probs within the same tolerance. Elsewhere (an attention kernel that ignores
    packed positions, a model without `position_ids`) the length buckets are used, and the reason is logged once.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self._verdict: dict[int, bool] = {}
        self._packing_verdict: dict[int, bool] = {}
        self._said: set[str] = set()  # fallback reasons already logged

    # ------------------------------------------------------------------------------------------------ passes
    def policy_forward(self, model, batch, kwargs) -> object | None:
        """The policy's per-token outputs for the target rows ([B, T-1] `log_probs`, `entropy`, `mean_logits`), with
        gradients; None where the fast path does not apply (the caller runs TRL's)."""
        if self.trainer.aux_loss_enabled:
            self._say(model, "the policy's forward must return the MoE router's auxiliary loss")
            return None
        if not self._usable(model, batch, _TARGET_KEYS):
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
        if self._packing_exact(model, batch, keys):
            per_token = logps.packed_completion_logps(model, *(batch[k] for k in keys))
            if per_token is not None:
                return per_token.sum(-1)
        out = logps.completion_logps(model, *(batch[k] for k in keys), bucket_overhead_tokens=self._overhead(False))
        return out.log_probs.sum(-1)

    def is_fast(self, model) -> bool:
        """Whether `model`'s causal LM passed its check (False before its first pass)."""
        return self._verdict.get(id(self.causal_lm(model)), False)

    # ------------------------------------------------------------------------------------------------ checks
    def _overhead(self, grad: bool) -> int | None:
        # Length buckets (and packs) make the number of forwards depend on each process's rows; a model wrapped by
        # DDP/FSDP/DeepSpeed runs collectives in every forward (buffer broadcasts, all-gathers, gradient hooks), so
        # there every process must make the same calls: one forward per pass, with or without gradients.
        t = self.trainer
        if t.accelerator.num_processes > 1 or t.is_deepspeed_enabled or t.is_fsdp_enabled:
            return None
        return logps.bucket_overhead(t.accelerator.device)

    def _usable(self, model, batch, keys) -> bool:
        lm = self.causal_lm(model)
        if lm is None:
            return False
        verdict = self._verdict.get(id(lm))
        if verdict is None:
            reason = self._why_not(model, lm, batch)
            if reason is None:
                reason = self._compare(model, batch, keys)
            verdict = self._verdict[id(lm)] = reason is None
            if reason is not None:
                self._say(model, reason)
        return verdict

    def _say(self, model, reason: str) -> None:
        """Logs a fallback once per trainer and reason (the policy and the reference usually share it)."""
        if reason not in self._said:
            self._said.add(reason)
            logger.info(
                "Using TRL's standard log-prob computation for %s (%s): %s; results are the same, only slower.",
                self._role(model),
                type(self.causal_lm(model)).__name__,
                reason,
            )

    def _role(self, model) -> str:
        ref = self.trainer.ref_model
        if ref is not None and self.causal_lm(ref) is self.causal_lm(model):
            return "the reference model"
        return "the model"

    def _packing_exact(self, model, batch, keys) -> bool:
        if not getattr(self.trainer.args, "pack_no_grad_passes", False) or self._overhead(grad=False) is None:
            return False  # packing, like buckets, would make the number of forwards differ between processes
        lm = self.causal_lm(model)
        verdict = self._packing_verdict.get(id(lm))
        if verdict is None:
            try:
                reason = self._compare(model, batch, keys, packed=True)
            except Exception as error:  # e.g. a model whose forward takes no `position_ids`
                reason = f"the packed forward failed ({type(error).__name__}: {error})"
            verdict = self._packing_verdict[id(lm)] = reason is None
            if reason is not None:
                logger.warning(
                    "Padding-free packing of the no-grad passes off for %s: %s. Using length buckets.",
                    type(lm).__name__,
                    reason,
                )
        return verdict

    def causal_lm(self, model):
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped

    def _why_not(self, model, lm, batch) -> str | None:
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        if getattr(self.trainer, "_is_vision_dataset", False):
            return "vision inputs"
        if is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning:
            return "prompt-learning PEFT adds virtual tokens"
        if not logps.install_completion_head(lm, autocast=self.trainer.accelerator.autocast):
            return (
                "its forward is not TRL's fused LM head with settings this package can read (another TRL version, "
                "or a wrapper around the forward other than accelerate's mixed precision)"
            )
        return None

    def _compare(self, model, batch, keys, packed: bool = False) -> str | None:
        """None when the fast path's per-sequence log-probs on this batch equal TRL's path's. `packed`: the
        padding-free pass in packs of twice the widest row (a single row is doubled, so that two sequences share one)."""
        ids, mask, completion = (batch[k] for k in keys)
        if packed and ids.size(0) == 1:
            ids, mask, completion = (torch.cat([x, x]) for x in (ids, mask, completion))
        labels = ids.masked_fill(completion == 0, -100)
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()  # dropout would make two passes differ
        try:
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
                ref = ref.log_probs[:, -(ids.size(1) - 1) :].sum(-1).double()
                if packed:
                    # packs twice the widest row: any two rows fit, so every pack but the last holds several
                    fast = logps.packed_completion_logps(model, ids, mask, completion, capacity=2 * ids.size(1))
                    if fast is None:
                        return "the batch is not right-padded"
                else:
                    overhead = self._overhead(grad=False)
                    fast = logps.completion_logps(model, ids, mask, completion, bucket_overhead_tokens=overhead)
                    fast = fast.log_probs
                fast = fast.sum(-1).double()
        finally:
            unwrapped.train(was_training)
        tolerance = 2e-2 if (self.trainer.args.bf16 or self.trainer.args.fp16) else 1e-4
        error = ((fast - ref).abs() / ref.abs().clamp(min=1.0)).max().item()
        if not error <= tolerance:
            return (
                f"its {'packed ' if packed else 'completion-only '}log-probs differ from TRL's by {error:.2e} on the "
                f"first batch (relative; tolerance {tolerance:g})"
            )
        return None


def fast_path(trainer) -> FastPath:
    """The trainer's [`FastPath`], created on first use."""
    path = trainer.__dict__.get("_fast_path")
    if path is None:
        path = trainer.__dict__["_fast_path"] = FastPath(trainer)
    return path
