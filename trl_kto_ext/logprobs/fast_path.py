"""The trainer's per-step log-prob passes on the fast path, checked once per model against TRL's path, else TRL's."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from accelerate.utils import is_peft_model

from trl_kto_ext.logprobs import completion as logps
from trl_kto_ext.logprobs import prompt_reuse, shared_prompt

logger = logging.getLogger(__name__)

TARGET_KEYS = ("input_ids", "attention_mask", "completion_mask")
KL_KEYS = ("KL_input_ids", "KL_attention_mask", "KL_completion_mask")


class FastPath:
    """Completion-only, length-bucketed forwards for one trainer ([`logps.completion_logps`]).

    Each causal LM (the policy's, the reference's) is checked the first time it is used: the per-sequence log-probs
    of that batch on the fast path must equal TRL's fused-head path (relative 1e-4 in fp32, 2e-2 under bf16/fp16
    autocast, where both paths round). A model that fails, or whose TRL head cannot be extended (another TRL version,
    prompt-learning PEFT, vision inputs; for the policy's forward also an MoE auxiliary loss), stays on TRL's path,
    and the reason is logged once per trainer (info). A check that raises (e.g. a quantized kernel that refuses a
    shape) is a fallback too, said once as a warning: a start-up check never stops a run, and an error that TRL's
    path shares is then raised by TRL's path itself. Models that accelerate prepared for mixed precision (bf16/fp16
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
        self._shared_verdict: dict[int, bool] = {}
        self._reuse_verdict: dict[int, bool] = {}  # the policy's KL rows continued from its recorded prompts
        self._recording: prompt_reuse.Recording | None = None
        self._said: set[tuple[str, str]] = set()  # fallback reasons already logged

    # ------------------------------------------------------------------------------------------------ passes
    def policy_forward(self, model, batch, kwargs) -> object | None:
        """The policy's per-token outputs for the target rows ([B, T-1] `log_probs`, `entropy`, `mean_logits`), with
        gradients; None where the fast path does not apply (the caller runs TRL's)."""
        self._recording = None  # a recording is only ever for the batch of the latest policy pass
        if self.trainer.aux_loss_enabled:
            self._say(model, "the policy's forward must return the MoE router's auxiliary loss")
            return None
        if not self._usable(model, batch, TARGET_KEYS):
            return None
        extra = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
        recording, call_kwargs = self._recorder(model, batch)
        keep_cache = prompt_reuse.cache_kept_under_checkpointing(self.causal_lm(model)) if recording else None
        with keep_cache or contextlib.nullcontext():
            out = logps.completion_logps(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["completion_mask"],
                fields=("log_probs", "entropy", "mean_logits"),
                bucket_overhead_tokens=self._overhead(grad=True),
                call_kwargs=call_kwargs,
                **extra,
            )
        self._recording = recording
        return out

    def _recorder(self, model, batch):
        """(recording, call_kwargs) for the policy's gradient pass where its KL rows can continue from the prompts'
        keys and values (every KL row i has row i's prompt, text only, one process), else (None, None)."""
        t, lm = self.trainer, self.causal_lm(model)
        if not t.calculate_KL or getattr(t.args, "humanline", False) or not t._only_text(batch):
            return None, None
        if self._overhead(grad=False) is None or self._reuse_verdict.get(id(lm)) is False:
            return None, None
        rows = shared_prompt.rows_from_batch(batch)
        if rows is None:
            return None, None
        prompts, completions = rows
        kl = [c[1] for c in completions]
        recording = prompt_reuse.Recording(id(batch["KL_input_ids"]), id(lm), prompts, kl, [])

        def call_kwargs(call_rows: list[int]) -> dict:
            keep = max(len(prompts[i]) for i in call_rows) - 1
            recorder = prompt_reuse.PromptRecorder(lm.config, keep) if keep > 0 else None
            recording.calls.append((call_rows, recorder))
            return {} if recorder is None else {"cache": recorder}

        return recording, call_kwargs

    def policy_kl_logps(self, model, batch, fallback: Callable) -> torch.Tensor:
        """Summed log-probs [K] of the policy's KL rows, continued from the prompt keys and values that the policy's
        gradient pass over the same batch recorded ([`prompt_reuse.continued_kl_logps`]) where that applies and the
        first check per model shows it exact; else `fallback(model, batch)` (the KL rows run in full)."""
        recording, self._recording = self._recording, None
        lm = self.causal_lm(model)
        if recording is None or (recording.batch_id, recording.model_id) != (id(batch["KL_input_ids"]), id(lm)):
            return fallback(model, batch)
        verdict, reason = self._reuse_verdict.get(id(lm)), None
        if not prompt_reuse.complete(recording, lm.config.get_text_config().num_hidden_layers):
            reason = "its decoder layers did not pass the cache on"
        else:
            try:
                with self.trainer.accelerator.autocast():
                    values = prompt_reuse.continued_kl_logps(
                        lm, logps.installed_head_settings(lm), recording, self._pad_id, self._overhead(grad=False)
                    )
            except Exception as error:  # e.g. a cache layout this model does not take back
                reason = f"the continued forward failed ({_one_line(error)})"
        prompt_reuse.close(recording)  # the recorders stay referenced by a checkpointed forward until its backward
        if verdict is None and reason is None:
            expected = fallback(model, batch)
            error = _relative_error(values, expected)
            if not error <= self._tolerance:
                reason = f"its continued KL log-probs differ from the full pass by {error:.2e} (relative)"
        if reason is not None:
            self._reuse_verdict[id(lm)] = False
            self._say(model, reason, "Running the policy's KL rows in full (prompt included)")
            return fallback(model, batch)
        self._reuse_verdict[id(lm)] = True
        return values

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

    @torch.no_grad()
    def token_logps(self, model, batch, keys) -> torch.Tensor | None:
        """Per-token completion log-probs [B, T-1] of the rows named by `keys` (zero outside the completion), no
        gradient, length-bucketed; None where the fast path does not apply (humanline's per-token reference)."""
        if not self._usable(model, batch, keys):
            return None
        return logps.completion_logps(
            model, *(batch[k] for k in keys), bucket_overhead_tokens=self._overhead(False)
        ).log_probs

    @torch.no_grad()
    def shared_prompt_logps(self, model, prompts, completions, padded: Callable[[], torch.Tensor]):
        """Summed completion log-probs [B, K] of K completions per prompt, each prompt run once
        ([`shared_prompt.shared_prompt_logps`]); None where that does not apply to `model` (the caller runs the
        padded passes). The first call per model also runs `padded()` (the same [B, K] values from the padded passes,
        or None where those are not on the fast path) and keeps the cached-prompt path for that model only if both
        agree within the tolerance of the other checks; otherwise the reason is logged once.

        Args:
            prompts: B token lists; completions: B lists of K token lists (see `shared_prompt_logps`).
        """
        if self._overhead(grad=False) is None:
            return None  # one forward per pass where several processes must make the same calls
        lm = self.causal_lm(model)
        verdict = self._shared_verdict.get(id(lm))
        if verdict is False:
            return None
        if verdict is None:
            expected = padded()  # also installs and checks the completion-only head
            if expected is None or not self._verdict.get(id(lm)):
                self._shared_verdict[id(lm)] = False  # off the fast path altogether: said once already
                return None
            reason, values = None, None
            settings = logps.installed_head_settings(lm)
            if settings is None:
                reason = "the completion-only head does not apply to it"
            else:
                try:
                    values = self._run_shared(lm, settings, prompts, completions)
                    error = _relative_error(values, expected)
                    if not error <= self._tolerance:
                        reason = f"its log-probs differ from the padded pass by {error:.2e} (relative)"
                except Exception as error:  # e.g. a forward without a KV cache or `position_ids`
                    reason = f"the cached-prompt forward failed ({_one_line(error)})"
            self._shared_verdict[id(lm)] = reason is None
            if reason is not None:
                self._say(model, reason, "Running each prompt once per completion (target and KL rows)")
                return None
            return values
        return self._run_shared(lm, logps.installed_head_settings(lm), prompts, completions)

    def _run_shared(self, lm, settings, prompts, completions) -> torch.Tensor:
        # The backbone is called directly, past accelerate's mixed-precision wrapper of the forward: its autocast here.
        with self.trainer.accelerator.autocast():
            values = shared_prompt.shared_prompt_logps(lm, settings, prompts, completions, self._pad_id)
        return values.float()

    def paired_rows_logps(self, reference, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Summed log-probs under `reference` of a collated batch's target rows [B] and KL rows [B], each prompt run
        once for both; None where row i's KL row does not have row i's prompt ([`shared_prompt.rows_from_batch`]) or
        [`shared_prompt_logps`] does not apply."""
        rows = shared_prompt.rows_from_batch(batch)
        if rows is None:
            return None

        def padded():  # the same values from the padded passes, for the first batch's check
            both = [self.sequence_logps(reference, batch, keys) for keys in (TARGET_KEYS, KL_KEYS)]
            return None if None in both else torch.stack(both, dim=-1)

        values = self.shared_prompt_logps(reference, *rows, padded)
        return None if values is None else (values[:, 0], values[:, 1])

    @property
    def _tolerance(self) -> float:
        """Relative tolerance of every check: both paths round under bf16/fp16 autocast."""
        return 2e-2 if (self.trainer.args.bf16 or self.trainer.args.fp16) else 1e-4

    @property
    def _pad_id(self) -> int:
        return getattr(self.trainer._tokenizer, "pad_token_id", None) or 0

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
            level = logging.INFO
            try:
                reason = self._why_not(model, lm, batch) or self._compare(model, batch, keys)
            except Exception as error:  # a check must not stop the run: TRL's path runs, and raises its own errors
                reason, level = f"its start-up check failed ({_one_line(error)})", logging.WARNING
            verdict = self._verdict[id(lm)] = reason is None
            if reason is not None:
                self._say(model, reason, level=level)
        return verdict

    def _say(
        self,
        model,
        reason: str,
        fallback: str = "Using TRL's standard log-prob computation",
        level: int = logging.INFO,
    ) -> None:
        """Logs a fallback once per trainer and reason (the policy and the reference usually share it)."""
        if (fallback, reason) not in self._said:
            self._said.add((fallback, reason))
            logger.log(
                level,
                "%s for %s (%s): %s; results are the same, only slower.",
                fallback,
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
                reason = f"the packed forward failed ({_one_line(error)})"
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
        with _without_dropout(self.trainer.accelerator.unwrap_model(model)), torch.no_grad():
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
            fast = fast.sum(-1)
        error, tolerance = _relative_error(fast, ref), self._tolerance
        if not error <= tolerance:
            return (
                f"its {'packed ' if packed else 'completion-only '}log-probs differ from TRL's by {error:.2e} on the "
                f"first batch (relative; tolerance {tolerance:g})"
            )
        return None


@contextlib.contextmanager
def _without_dropout(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for a check's passes: every module in eval mode, except those whose eval-mode forward changes their
    own weights, which keep their mode (bitsandbytes' `Linear4bit` repacks its weight for CPU inference on its first
    no-grad eval forward, a layout that rejects some shapes and gives no input gradient after). Each module's own
    mode is restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    try:
        for module in modes:
            if not _eval_changes_weights(module):
                module.training = False
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _eval_changes_weights(module: torch.nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None  # a 4-bit bitsandbytes layer


def _one_line(error: BaseException) -> str:
    """`Type: message`, first line only, at most 300 characters."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |got - expected| / max(|expected|, 1) (summed log-probs; 1 keeps values near 0 absolute)."""
    got, expected = got.double(), expected.to(got.device).double()  # the precompute's padded values are on the host
    return ((got - expected).abs() / expected.abs().clamp(min=1.0)).max().item()


def fast_path(trainer) -> FastPath:
    """The trainer's [`FastPath`], created on first use."""
    path = trainer.__dict__.get("_fast_path")
    if path is None:
        path = trainer.__dict__["_fast_path"] = FastPath(trainer)
    return path
