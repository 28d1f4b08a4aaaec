"""KTOExtTrainer: TRL's KTOTrainer with collation-time KL pairing, automatic loss aversion and a pure loss function."""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)
import contextlib
import logging
from collections import defaultdict
from typing import Any, NamedTuple

import torch
from accelerate.utils import is_peft_model
from transformers import Trainer
from trl import KTOConfig, KTOTrainer

from trl_kto_ext.collator import KTOExtCollator, keep_kl_rows
from trl_kto_ext.config import as_ext_config
from trl_kto_ext.data import sampling, special_tokens, validation
from trl_kto_ext.data.scores import labels_from_scores
from trl_kto_ext.data.truncation import truncate_prompts
from trl_kto_ext.data.unpairing import as_unpaired
from trl_kto_ext.data.weights import WEIGHT, batch_weight_total
from trl_kto_ext.logprobs import humanline, ref_cache, reference
from trl_kto_ext.logprobs.fast_path import KL_KEYS, TARGET_KEYS, fast_path
from trl_kto_ext.logprobs.reference import HostReference, frozen_copy
from trl_kto_ext.loss import apo_zero_unpaired_loss, kto_loss
from trl_kto_ext.loss_aversion import LossAversion, loss_aversion_for
from trl_kto_ext.models.gguf import resolve_gguf
from trl_kto_ext.pairing import SINGLE_PROMPT_NOTE, add_dataset_kl_pairing, single_prompt
from trl_kto_ext.report import step_metrics
from trl_kto_ext.report.start import StartReport
from trl_kto_ext.training import guards, options, resume
from trl_kto_ext.training.kbit_layers import keep_4bit_layers_trainable
from trl_kto_ext.training.library_messages import setup_warnings_silenced
from trl_kto_ext.training.peft_utils import asks_for_kbit, check_adapters_off_reference, check_kbit_backend
from trl_kto_ext.training.scoped import (
    activation_checkpointing_off,
    attribute,
    loss_type_during_setup,
    without_trl_weight_advice,
)
from trl_kto_ext.training.settings_guard import SettingsReadWhenBuilt
from trl_kto_ext.trl_internals import use_adapter
from trl_kto_ext.vision import vision_collator, with_decoded_labels

logger = logging.getLogger(__name__)
# Keys of a collated batch that are not model inputs.
_NON_MODEL_KEYS = {
    "completion_mask",
    "KL_input_ids",
    "KL_attention_mask",
    "KL_completion_mask",
    "KL_token_type_ids",
    "KL_mm_token_type_ids",
    "label",
    "ref_logps",
    "ref_KL_logps",
    "weight",
}


class SequenceLogps(NamedTuple):
    """Per-sequence log-probabilities summed over completion tokens (shapes [B] and [K])."""

    policy: torch.Tensor
    reference: torch.Tensor
    kl_policy: torch.Tensor
    kl_reference: torch.Tensor


class KTOExtTrainer(KTOTrainer):
    """Drop-in replacement for `trl.KTOTrainer` (same constructor arguments).

    What changes:
    - The KL rows are built by [`KTOExtCollator`] when each batch is collated, from a random pairing of every prompt
      with a completion written for a different prompt; so any sampler works (shuffled by default) and any batch size,
      1 included. TRL instead rotates completions when tokenizing, which needs its sequential sampler.
    - lambda_D / lambda_U come from the class counts (`loss_aversion="auto"`) or are checked (`"manual"`), and are
      logged with the effective ratio and with z0 before (`kl_raw`) and after (`kl`) the clamp.
    - The loss is [`kto_loss`], a pure function; z0 is the mean KL log-ratio over the KL rows of all processes.
    """

    from trl_kto_ext.report.model_card import (
        create_model_card,  # TRL's card names no local base, data or lambda: model_card.py
    )

    def __init__(self, model, ref_model=None, args: KTOConfig | None = None, data_collator=None, **kwargs):
        args = as_ext_config(args, model)
        model, from_gguf = resolve_gguf(model, args, kwargs)  # a GGUF file trains and saves as a normal model
        self._reference_source = model if isinstance(model, str) else None  # to reload a reference not kept
        options.check_trainer(model, args, kwargs)  # options needing an accelerator, a package, a model feature
        if isinstance(model, str) and asks_for_kbit(kwargs.get("quantization_config"), args.model_init_kwargs):
            check_kbit_backend(args.device.type)  # a clear message before any weights are loaded
        self._vocab_rows = validation.check_before_setup(model, args, kwargs)  # empty train set, pad token
        self._position_limit = validation.fit_max_length(model, args)  # within the model's position embeddings
        if ref_model is None and reference.needs_reference_copy(model, args, kwargs.get("peft_config")):
            # TRL reloads the reference from `model.config._name_or_path`, which fails for a model built in memory and
            # is wrong for one changed since loading (e.g. after SFT in the same notebook): copy the model as given.
            ref_model = frozen_copy(model)
        self.loss_aversion: LossAversion | None = None
        self._host_reference: HostReference | None = None
        self._uses_kl = args.loss_type != "apo_zero_unpaired"
        user_collator = data_collator
        # TRL fixes KL completions while tokenizing and therefore refuses shuffled samplers and batches of one. This
        # trainer pairs at collation time, so TRL's set-up runs as for a loss without a KL term (which skips its
        # tokenization-time pairing and those checks); the real loss type is restored right after.
        with (
            loss_type_during_setup(args, "apo_zero_unpaired"),
            setup_warnings_silenced(),
            attribute(args, "model_init_kwargs", None if from_gguf else args.model_init_kwargs),
        ):  # the GGUF kwargs were used above: TRL would call them ignored
            super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator, **kwargs)
        validation.check_sharding(args, self.is_fsdp_enabled)  # FSDP asked for but not set up: stop, not plain DDP
        keep_4bit_layers_trainable(self.model, self.ref_model)  # bitsandbytes' CPU repacking has no backward pass
        check_adapters_off_reference(self.model, self.ref_model)  # with adapters off as reference, only they train
        self.loss_type = args.loss_type
        self.calculate_KL = self._uses_kl
        if user_collator is None and self._is_vision_dataset:
            # TRL built its vision collator under the set-up loss type (no KL rows), and does not prepare vision
            # datasets (rows are tokenized when collated): the loss aversion is counted here.
            self.train_dataset = with_decoded_labels(self.train_dataset)  # a ClassLabel by its names, as for text
            self.eval_dataset = with_decoded_labels(self.eval_dataset)
            self._set_loss_aversion(self.train_dataset, args)
            self.data_collator = vision_collator(
                self.processing_class, args, self.calculate_KL, _pairing_seed(args), self.train_dataset
            )
        elif user_collator is None:
            self.data_collator = KTOExtCollator(
                pad_token_id=self._tokenizer.pad_token_id,
                max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of,
                seed=_pairing_seed(args),
                build_kl=self.calculate_KL,
                fallback_dataset=self.train_dataset,  # a stream: its first rows, read by their own iterator
                use_dataset_pairing=args.kl_pairing == "dataset",
            )
        reference.keep_a_reference(self)  # the KL rows or evaluation still need one when the targets' are cached
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._evaluating = 0
        step_metrics.check_best_metric(self)  # metric_for_best_model that a one-class eval set cannot report
        self.add_callback(StartReport(self))
        self.add_callback(guards.NonFiniteStreak(self))
        self._built_settings = SettingsReadWhenBuilt(args)  # a field read above and changed before train(): refused

    # ----------------------------------------------------------------------------------------------- data set-up
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = labels_from_scores(dataset, args, dataset_name)  # a `score` column, no label: online KTO's rule
        validation.check_dataset(dataset, processing_class, dataset_name)
        # Labels read by meaning (a ClassLabel by its names) and pairs unpaired side by side, by the conversion that
        # prepare_unpaired and the CLI use; TRL's own unpairing would put every chosen row before every rejected one.
        dataset = as_unpaired(dataset)
        conversational = special_tokens.is_conversational_dataset(dataset)
        special_tokens.check_can_end_completions(self._tokenizer, conversational, dataset_name)
        # KL rows are paired by the collator: never add TRL's tokenization-time `KL_completion_ids` (its rotation
        # within fixed blocks needs the sequential sampler). Rows whose prompt fills max_length are dropped by
        # `check_tokenized`, which logs how many (TRL drops them silently).
        # TRL's own weight advice repeats ours with other bounds (ours: loss_aversion.resolve_loss_aversion): dropped.
        with attribute(self, "calculate_KL", False), attribute(args, "max_length", None), without_trl_weight_advice():
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        dataset = special_tokens.fix_special_tokens(dataset, self._tokenizer, conversational, dataset_name)
        dataset = truncate_prompts(dataset, args, processing_class, dataset_name)  # keep_end: long prompts shortened
        dataset = validation.check_tokenized(
            dataset,
            args.max_length,
            dataset_name,
            self._vocab_rows,
            self._tokenizer,
            position_limit=self._position_limit,
        )
        if dataset_name == "train":
            self._set_loss_aversion(dataset, args)  # counted over the rows kept: none of those dropped above
        if dataset_name == "train" and self._uses_kl and single_prompt(dataset):
            logger.warning(SINGLE_PROMPT_NOTE)  # no mismatched pair: z0 = 0 rather than a row paired with itself
            self._uses_kl = False
        if dataset_name == "train" and self._uses_kl and args.kl_pairing == "dataset":
            dataset = add_dataset_kl_pairing(dataset, _pairing_seed(args), getattr(args, "kl_pairing_from_default", 0))
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()  # TRL's KTO columns; the per-row weight reaches the collator too
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, WEIGHT]))

    def _get_train_sampler(self, train_dataset=None):
        # transformers infers lengths for group_by_length / batch_rebalance from `input_ids` (absent from KTO rows)
        # or a length column, which its column pruning has removed by now: give it the lengths.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return super()._get_train_sampler(sampling.with_lengths(dataset, self.args, source=self.train_dataset))

    def _precompute_ref_logps(self, dataset, name, batch_size):
        keep_4bit_layers_trainable(self.model, self.ref_model)  # TRL precomputes inside its __init__: before that
        reference.check_reference_available(self, f"the reference log-probs of the {name!r} dataset")
        # A pairing fixed over the dataset caches the KL rows' reference log-probs too; else they are run per step.
        cache_kl = self._uses_kl and "KL_completion_ids" in dataset.column_names
        # One length-sorted, completion-only pass over target and KL sequences together, persisted on disk by the
        # reference weights' and the data's fingerprints (`ref_cache`); TRL's precompute where that does not apply.
        with attribute(self, "calculate_KL", cache_kl):
            result = ref_cache.precompute(self, dataset, name, batch_size)
            return result if result is not None else super()._precompute_ref_logps(dataset, name, batch_size)

    def _kl_reference_needed_per_step(self) -> bool:
        return self._uses_kl and self.precompute_ref_logps and self.args.kl_pairing == "batch"

    def _set_loss_aversion(self, dataset, args) -> None:
        self.loss_aversion = loss_aversion_for(dataset, args)  # a stream: counted from a bounded look-ahead
        self.desirable_weight = self.loss_aversion.desirable_weight
        self.undesirable_weight = self.loss_aversion.undesirable_weight

    # ------------------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        labels = batch["label"].bool()
        if self.calculate_KL and self.args.kl_subset_size is not None:
            batch = keep_kl_rows(batch, self.args.kl_subset_size)
        outputs = self._policy_forward(model, batch)
        if self.args.humanline:  # per-token log-ratios clamped to [epsilon_P, epsilon_R] (arXiv 2509.24207)
            logps = SequenceLogps(*humanline.clamped_logps(self, model, batch, outputs))
        else:
            reference, kl_reference = self._reference_logps(batch)
            logps = SequenceLogps(
                policy=outputs.log_probs[:, -(batch["input_ids"].size(1) - 1) :].sum(-1),
                reference=reference,
                kl_policy=fast_path(self).policy_kl_logps(model, batch, self._compute_kl_logps)
                if self.calculate_KL
                else reference[:0],
                kl_reference=kl_reference if self.calculate_KL else reference[:0],  # no KL rows: z0 = 0
            )
        lambdas = (self.beta, self.desirable_weight, self.undesirable_weight)
        weighting = {"weights": batch.get(WEIGHT), "weight_total": batch_weight_total(self, batch.get(WEIGHT))}
        if self.loss_type == "apo_zero_unpaired":
            result = apo_zero_unpaired_loss(logps.policy, logps.reference, labels, *lambdas, **weighting)
        else:  # z0: the KL log-ratios' mean over the KL rows of all processes
            z0 = self._global_reference_point(logps.kl_policy - logps.kl_reference)
            result = kto_loss(*logps, labels, *lambdas, reference_point=z0, **weighting)
        loss = result.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        loss, record = guards.guard_loss(self, mode, batch, loss)  # a batch without completion tokens, NaN/inf
        if record:
            step_metrics.record(self, mode, batch, labels, logps, outputs, result.metrics)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**self._model_kwargs(batch))
            return loss, outputs
        return loss

    def _model_kwargs(self, batch: dict[str, Any]) -> dict[str, Any]:
        kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        kwargs["use_cache"] = False
        return kwargs

    def _policy_forward(self, model, batch):
        kwargs = self._model_kwargs(batch)
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        outputs = fast_path(self).policy_forward(model, batch, kwargs)  # completion positions only, bucketed
        if outputs is not None:
            return outputs
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        return model(**kwargs, labels=labels, fused_lm_head=True)

    @contextlib.contextmanager
    def _reference(self):
        """Yields the reference model: `ref_model`, the policy with its adapters disabled (PEFT), the reference kept
        in host memory, or the policy itself only before its first update; otherwise raises a `RuntimeError`."""
        with torch.no_grad(), activation_checkpointing_off(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    yield self.model
            elif self.ref_model is not None:
                yield self.ref_model
            elif reference.host_reference(self) is not None:  # a reference not kept (all cached) is reloaded
                with self._host_reference.on_device() as ref:
                    yield ref
            else:
                reference.check_reference_available(self, "reference log-probs")
                yield self.model  # not updated yet: the policy is still the reference

    def _reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference log-probs of the target rows [B] and the KL rows [K] (None without KL rows)."""
        both = self._shared_prompt_reference(batch)
        if both is not None:
            return both
        return self._reference_target_logps(batch), (self._reference_kl_logps(batch) if self.calculate_KL else None)

    def _shared_prompt_reference(self, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        # Row i's target and KL row share row i's prompt: the reference runs it once for both (KV cache).
        if not self.calculate_KL or "ref_logps" in batch or "ref_KL_logps" in batch or not self._only_text(batch):
            return None
        with self._reference() as ref:
            return fast_path(self).paired_rows_logps(ref, batch)

    def _only_text(self, batch) -> bool:
        return set(self._model_kwargs(batch)) == {"input_ids", "attention_mask", "use_cache"}

    def _reference_target_logps(self, batch) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].to(self.accelerator.device)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kwargs = {k: v for k, v in self._model_kwargs(batch).items() if k != "output_router_logits"}
        with self._reference() as ref:
            if self._only_text(batch):
                fast = fast_path(self).sequence_logps(ref, batch, TARGET_KEYS)
                if fast is not None:
                    return fast
            per_token = ref(**kwargs, labels=labels, fused_lm_head=True).log_probs
        return per_token[:, -(batch["input_ids"].size(1) - 1) :].sum(-1)

    def _reference_kl_logps(self, batch) -> torch.Tensor:
        if "ref_KL_logps" in batch:
            return batch["ref_KL_logps"].to(self.accelerator.device)
        with self._reference() as ref:
            return self._compute_kl_logps(ref, batch)

    def _compute_kl_logps(self, model, batch):
        # Log-probs only (no entropy / mean logits), completion positions only, length-bucketed; else TRL's.
        use_fast = self.calculate_KL and self._only_text(batch)
        fast = fast_path(self).sequence_logps(model, batch, KL_KEYS) if use_fast else None
        return fast if fast is not None else super()._compute_kl_logps(model, batch)

    def _global_reference_point(self, kl_logratios: torch.Tensor) -> torch.Tensor:
        """z0 before the clamp: the sum of KL log-ratios over all processes divided by their total count, so a
        process with fewer KL rows is not over-weighted."""
        totals = torch.stack([kl_logratios.detach().float().sum(), kl_logratios.new_tensor(kl_logratios.numel())])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.float(), reduction="sum")
        return totals[0] / totals[1].clamp(min=1)

    # --------------------------------------------------------------------------------------------------- metrics
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        step_metrics.add_train_window(self, logs)  # means over the window's rows; TRL's `log` averages batch means
        Trainer.log(self, logs, start_time)

    # ------------------------------------------------------------------------------------ evaluation and predict
    # Overridden at `evaluation_loop`, the one pass shared by `evaluate` and `predict`, so every entry point (any
    # `metric_key_prefix`, several eval sets, the evaluations during training) reports its own pass's KTO metrics.
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        with step_metrics.eval_pass(self), reference.reference_for_pass(self):
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            output.metrics.update(step_metrics.pass_metrics(self, metric_key_prefix))  # means over the pass's rows
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """TRL's `evaluate`; with cached reference log-probs, a dataset given here after training gets its reference
        log-probs from the reference kept in host memory (TRL refuses). Returns `{prefix}_*` metrics, KTO's included."""
        if self._is_vision_dataset and not isinstance(eval_dataset, str):
            eval_dataset = with_decoded_labels(eval_dataset)  # TRL does not prepare vision rows: labels by meaning
        self._evaluating += 1
        try:
            with reference.reference_for_pass(self):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._evaluating -= 1

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """Like `evaluate` on `test_dataset` (tokenized and, with `precompute_ref_log_probs`, its reference log-probs
        computed as there); returns a `PredictionOutput` whose `metrics` carry the `{prefix}_` KTO metrics."""
        with reference.reference_for_pass(self):
            if self._is_vision_dataset:
                test_dataset = with_decoded_labels(test_dataset)
            else:
                test_dataset = self._prepare_dataset(test_dataset, self.processing_class, self.args, "eval")
                if self.precompute_ref_logps and "ref_logps" not in (test_dataset.column_names or ()):
                    batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
                    test_dataset = self._precompute_ref_logps(test_dataset, metric_key_prefix, batch_size)
            return super().predict(test_dataset, ignore_keys, metric_key_prefix)

    # ---------------------------------------------------------------------------------------- resume the pairing
    def _get_dataloader(self, dataset, *args, is_training: bool = False, **kwargs):
        with attribute(self, "data_collator", resume.collator_for_dataloader(self, is_training, dataset)):
            return super()._get_dataloader(dataset, *args, is_training=is_training, **kwargs)

    def train(self, *args, **kwargs):
        self._built_settings.check(self.args)
        return guards.corrected_train_output(super().train(*args, **kwargs))

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        guards.after_training_step(self)  # that batch is consumed; a skipped step's gradients are discarded
        return loss

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        step_metrics.count_tokens(self)  # `num_tokens` saved below counts the steps not yet logged too
        resume.save_pairing_state(self, output_dir)  # the state before the first batch not yet trained on

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        resume.load_pairing_state(self, checkpoint)  # before the resumed run collates its first batch


def _pairing_seed(args) -> int:
    return args.kl_pairing_seed if args.kl_pairing_seed is not None else args.seed
