"""KTOExtConfig: TRL's KTOConfig plus loss-aversion and KL-pairing settings, checked on construction."""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)
import copy
import warnings
from dataclasses import dataclass, field, fields

from trl import KTOConfig

from trl_kto_ext.data.sampling import STRATEGIES
from trl_kto_ext.data.scores import LABEL_MODES, SCORE_WEIGHTINGS
from trl_kto_ext.training import options
from trl_kto_ext.training.config_numbers import check_numbers
from trl_kto_ext.training.feature_options import (
    HUMANLINE_LOG_EPSILON,
    HUMANLINE_SYNC_STEPS,
    TRUNCATION_MODES,
    check_features,
    resolve_kl_pairing,
    resolve_reference_sync,
)

# Eq. (8) of the KTO paper (arXiv 2402.01306): lambda_D * n_D / (lambda_U * n_U) should lie in [1, 4/3].
LOSS_AVERSION_RANGE = (1.0, 4.0 / 3.0)
_RANGE_TOLERANCE = 1e-6


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return torch.cuda.is_available() or bool(accelerator and accelerator.is_available())


def _bf16_accelerator_available() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available

    return is_torch_bf16_gpu_available()


@dataclass
class KTOExtConfig(KTOConfig):
    r"""
    Configuration for [`KTOExtTrainer`]. Every field of `trl.KTOConfig` keeps its meaning; the fields below are added.

    Differences from TRL's defaults:
    - `train_sampling_strategy` defaults to `"random"`: the KL rows are built when a batch is collated, so any
      sampler works (TRL requires `"sequential"`).
    - `bf16` left unset is on where a bf16-capable accelerator (or `use_cpu=True`) is present and off otherwise,
      so the default config also works on a machine without a GPU (TRL's raises there unless `use_cpu` is set).
    - A field set after construction (`args.desirable_weight = 3.5`) counts as if given to the constructor: a trainer
      re-derives every resolved setting from the fields when it starts ([`~KTOExtConfig.refresh`]), and refuses a
      value the constructor refuses. Every numeric field is checked for NaN, inf, sign and range
      (trl_kto_ext/training/config_numbers.py).

    Args:
        loss_aversion (`str`, defaults to `"auto"`):
            `"auto"` counts desirable (n_D) and undesirable (n_U) training rows once, keeps lambda_U = 1 and sets
            lambda_D = loss_aversion_target * n_U / n_D. `"manual"` uses `desirable_weight` / `undesirable_weight`.
        loss_aversion_target (`float`, defaults to `1.0`):
            Target of lambda_D * n_D / (lambda_U * n_U) in `"auto"` mode; must lie in [1, 4/3] (paper, Eq. 8).
        loss_aversion_stream_rows (`int`, defaults to `1000`):
            For a streamed training set (`IterableDataset`), the number of its first rows read ahead (by a separate
            iterator) to count n_D and n_U; the printed loss-aversion line names what was counted.
        kl_pairing_seed (`int` or `None`, defaults to `None`):
            Seed of the random mismatched pairing used for the KL rows; `None` uses `seed`.
        kl_pairing (`str` or `None`, defaults to `None`):
            `"batch"` pairs inside each collated batch; `"dataset"` fixes one pairing over the training set so the
            KL rows' reference log-probs can be cached with `precompute_ref_log_probs`. Unset: `"dataset"` when
            `precompute_ref_log_probs=True` (the cached step then runs no reference forward, as TRL's), else
            `"batch"`; `kl_pairing_from_default` records that it was unset.
        kl_subset_size (`int` or `None`, defaults to `None`):
            Number of KL rows per batch used to estimate z0 (all when None).
        ref_cache (`bool`, defaults to `True`):
            Persist precomputed reference log-probs on disk, keyed by the reference weights and the tokenized data.
        ref_cache_dir (`str` or `None`, defaults to `None`):
            Where; None: `$TRL_KTO_EXT_REF_CACHE`, else `~/.cache/trl_kto_ext/ref_logps`.
        pack_no_grad_passes (`bool`, defaults to `False`):
            Run the no-gradient passes (reference, policy KL rows, reference precompute) padding-free: rows packed end
            to end with `position_ids` restarting per row. Used only on models where a start-up check shows it gives
            the padded log-probs; otherwise length buckets, with one log line.
        on_nonfinite_loss (`str`, defaults to `"raise"`):
            `"raise"` stops at a NaN/inf training loss with a message naming the step; `"skip"` gives that step a zero
            gradient and counts it in the `skipped/nonfinite_steps` metric.
        max_consecutive_nonfinite_steps (`int`, defaults to `10`):
            With `"skip"`, this many consecutive optimizer steps with a NaN/inf loss or gradient raise
            `NonFiniteLossError`: a run whose every step is skipped has stopped learning.
        label_mode (`str`, defaults to `"threshold"`), desirable_threshold (`float`, defaults to `0.5`):
            How a dataset with a `score` column and no `label` is labelled, by the rule online KTO uses for rewards
            (`trl_kto_ext.data.scores`): `"threshold"`, desirable iff score >= desirable_threshold; `"relative"`,
            desirable iff score > the mean score of the same prompt's completions (ties undesirable, prompts whose
            scores are all equal left out).
        score_weighting (`str`, defaults to `"none"`):
            `"distance"`: each score-labelled row also weighs |score - threshold| (or |score - prompt mean|).
        truncation_mode (`str`, defaults to `"keep_start"`):
            Rows longer than max_length: `"keep_start"` cuts the end of the completion and drops rows whose prompt
            alone fills max_length; `"keep_end"` shortens the prompt from its start (whole earlier turns of a
            conversation, the system turn kept) so the completion stays whole.
        humanline (`bool`, defaults to `False`):
            Humanline KTO (Liu, Muennighoff and Ethayarajh, arXiv 2509.24207): per-token log-ratios clamped to
            [humanline_log_epsilon_P, humanline_log_epsilon_R] and, unless sync_ref_model=False, the reference set to
            the policy every ref_model_sync_steps steps.
        sync_ref_model (`bool` or `None`), ref_model_mixup_alpha (`float` or `None`), ref_model_sync_steps (`int` or
            `None`): TRL's reference sync (TR-DPO); unset, they take TRL's defaults (off, 0.6, 512), or with humanline
            (on, 1.0, 1).
    """

    train_sampling_strategy: str = field(
        default="random",
        metadata={
            "help": "Sampler for the training dataloader: 'random', 'sequential', 'group_by_length' (batches of "
            "similar lengths) or 'batch_rebalance' (padded-token cost balanced across devices). Any sampler works "
            "because the KL rows are paired when each batch is collated.",
            "choices": list(STRATEGIES),
        },
    )
    loss_aversion: str = field(
        default="auto",
        metadata={
            "help": "How lambda_D / lambda_U are set. 'auto': from the class counts of the training set "
            "(lambda_U = 1, lambda_D = loss_aversion_target * n_U / n_D). 'manual': use desirable_weight and "
            "undesirable_weight as given.",
            "choices": ["auto", "manual"],
        },
    )
    loss_aversion_target: float = field(
        default=1.0,
        metadata={
            "help": "Target value of lambda_D * n_D / (lambda_U * n_U) in 'auto' mode. The KTO paper (Eq. 8) advises "
            "a value in [1, 4/3]."
        },
    )
    loss_aversion_stream_rows: int = field(
        default=1000,
        metadata={
            "help": "For a streamed training set (IterableDataset): how many of its first rows are read ahead, by a "
            "separate iterator, to count n_D and n_U for the loss aversion. The printed loss-aversion line says how "
            "many rows were counted."
        },
    )
    kl_pairing_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the random mismatched (prompt, completion) pairing of the KL rows. None: `seed`."},
    )

    kl_pairing: str | None = field(
        default=None,
        metadata={
            "help": "Where the KL rows' mismatched completions come from. 'batch': a fresh random pairing inside each "
            "collated batch (the paper's estimator). 'dataset': one seeded random pairing of every training row with "
            "a row of another prompt, fixed for the run, so that with precompute_ref_log_probs the reference "
            "log-probs of the KL rows are cached too (no reference forward per step). Unset: 'dataset' with "
            "precompute_ref_log_probs, 'batch' otherwise.",
            "choices": ["batch", "dataset"],
        },
    )
    kl_subset_size: int | None = field(
        default=None,
        metadata={
            "help": "Estimate z0 from only this many KL rows of each batch (None: all of them). Fewer rows make the "
            "no-gradient KL passes cheaper but the estimate noisier; logged as `kl_rows`. Off by default."
        },
    )
    ref_cache: bool = field(
        default=True,
        metadata={
            "help": "With precompute_ref_log_probs, keep the reference log-probs on disk keyed by a hash of every "
            "reference weight and of the tokenized data (and precision, max_length), so a later run with the same "
            "reference and data reads them instead of running the reference. The location and hit/miss are logged."
        },
    )
    ref_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of the reference log-prob cache. None: $TRL_KTO_EXT_REF_CACHE, else "
            "~/.cache/trl_kto_ext/ref_logps."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of activation_checkpointing (transformers 5), which is on by default (TRL's "
            "default); leave this unset."
        },
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Pin the dataloader's memory. Unset: on where a GPU/accelerator is used, off on CPU."},
    )
    pack_no_grad_passes: bool = field(
        default=False,
        metadata={
            "help": "Padding-free no-gradient passes (rows packed with restarting position_ids, block-diagonal "
            "attention), on models where a start-up check shows the log-probs equal the padded ones; else length "
            "buckets. Off by default: slower than the buckets on CPU (docs/benchmark.md)."
        },
    )
    on_nonfinite_loss: str = field(
        default="raise",
        metadata={
            "help": "What a NaN/inf training loss does. 'raise': stop with an error naming the step and the likely "
            "causes. 'skip': the step gets a zero gradient (weights never take NaN/inf), is counted in the "
            "`skipped/nonfinite_steps` metric, and training goes on.",
            "choices": ["raise", "skip"],
        },
    )

    max_consecutive_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "With on_nonfinite_loss='skip': this many optimizer steps in a row with a NaN/inf loss or gradient "
            "stop the run with NonFiniteLossError (the run is no longer learning). Must be at least 1."
        },
    )

    label_mode: str = field(
        default="threshold",
        metadata={
            "help": "How a `score` column (used when the data has no `label`) becomes labels, by online KTO's rule. "
            "'threshold': desirable iff score >= desirable_threshold. 'relative': desirable iff score > the mean "
            "score of the same prompt's completions (ties undesirable; prompts whose scores are all equal are left "
            "out).",
            "choices": list(LABEL_MODES),
        },
    )
    desirable_threshold: float = field(
        default=0.5, metadata={"help": "Score at or above which a row is desirable (label_mode='threshold')."}
    )
    score_weighting: str = field(
        default="none",
        metadata={
            "help": "'distance': each row labelled from its score also weighs |score - desirable_threshold| "
            "('threshold') or |score - its prompt's mean score| ('relative'), times any `weight` column. 'none': no "
            "extra weight.",
            "choices": list(SCORE_WEIGHTINGS),
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "What a row longer than max_length keeps. 'keep_start': the start (the end of the completion is "
            "cut; a row whose prompt alone fills max_length is dropped). 'keep_end': the whole completion and the end "
            "of the prompt (a conversation keeps whole final turns and its system turn); the start line says how "
            "many rows were shortened.",
            "choices": list(TRUNCATION_MODES),
        },
    )
    humanline: bool = field(
        default=False,
        metadata={
            "help": "Humanline KTO (arXiv 2509.24207): clamp each completion token's log(pi_theta/pi_ref) to "
            "[humanline_log_epsilon_P, humanline_log_epsilon_R] (a clamped token adds its bound and no gradient) and "
            "sync the reference to the policy every ref_model_sync_steps steps (sync_ref_model=False: clamp only). "
            "The share of unclamped tokens is logged as `humanline/unclamped`."
        },
    )
    humanline_log_epsilon_P: float = field(
        default=HUMANLINE_LOG_EPSILON[0],
        metadata={"help": "Lower bound of the clamped per-token log-ratio (humanline; <= 0)."},
    )
    humanline_log_epsilon_R: float = field(
        default=HUMANLINE_LOG_EPSILON[1],
        metadata={"help": "Upper bound of the clamped per-token log-ratio (humanline; >= 0)."},
    )
    sync_ref_model: bool | None = field(
        default=None,
        metadata={
            "help": "Set the reference to a mix of itself and the policy every ref_model_sync_steps steps (TRL's "
            "TR-DPO sync). Unset: on with humanline, off otherwise. Needs a separate reference model (not LoRA) "
            "and no precompute_ref_log_probs."
        },
    )
    ref_model_mixup_alpha: float | None = field(
        default=None,
        metadata={
            "help": "alpha of the sync: pi_ref = alpha * pi_theta + (1 - alpha) * pi_ref. Unset: 1.0 with humanline "
            "(the reference becomes the policy), TRL's 0.6 otherwise."
        },
    )
    ref_model_sync_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps between reference syncs. Unset: "
            f"{HUMANLINE_SYNC_STEPS} with humanline, TRL's 512 otherwise."
        },
    )

    def __post_init__(self):
        given = self._field_values()  # before anything is resolved: `refresh` re-derives from these
        resolve_kl_pairing(self)  # unset: 'dataset' with precompute_ref_log_probs (no reference pass per step)
        resolve_reference_sync(self)  # TRL's sync fields left unset: TRL's defaults, or humanline's
        check_numbers(self)  # NaN, inf, sign, range: one line naming the field (before TrainingArguments' own checks)
        # TRL's default gradient_checkpointing=True would make transformers warn (deprecated alias) on every config;
        # a value the user gave under the old name still gets transformers' warning.
        if self.gradient_checkpointing is None and getattr(self, "activation_checkpointing", False) is None:
            self.activation_checkpointing = True
        elif self.gradient_checkpointing is None and not hasattr(self, "activation_checkpointing"):
            self.gradient_checkpointing = True  # a transformers without the new name
        if self.dataloader_pin_memory is None:  # torch warns when memory is pinned with no accelerator to copy to
            self.dataloader_pin_memory = not self.use_cpu and _accelerator_available()
        if self.bf16 is None and not self.fp16:
            # TRL turns bf16 on whenever it is unset, which makes a plain `KTOConfig(output_dir=...)` fail on a machine
            # without a bf16 GPU unless `use_cpu` is given. Unset here means: bf16 where the hardware has it.
            self.bf16 = bool(self.use_cpu) or _bf16_accelerator_available()
            self.bf16_from_default = self.bf16  # said once when training starts (the trainer's start report)
        options.check_config(self)  # options transformers' own set-up below would fail on with a deep traceback
        super().__post_init__()
        if self.loss_aversion not in ("auto", "manual"):
            raise ValueError(
                f"`loss_aversion` must be 'auto' or 'manual', got {self.loss_aversion!r}. Use 'auto' to set the "
                "weights from the class counts, or 'manual' to use desirable_weight/undesirable_weight as given."
            )
        low, high = LOSS_AVERSION_RANGE
        if not (low - _RANGE_TOLERANCE <= float(self.loss_aversion_target) <= high + _RANGE_TOLERANCE):
            raise ValueError(
                f"`loss_aversion_target` = {self.loss_aversion_target} is outside [1, 4/3]: the KTO paper (Eq. 8) "
                "advises lambda_D * n_D / (lambda_U * n_U) between 1 and 4/3. Pick a value in that range, or set "
                "loss_aversion='manual' and give desirable_weight/undesirable_weight yourself."
            )
        if self.loss_aversion == "auto" and (self.desirable_weight != 1.0 or self.undesirable_weight != 1.0):
            warnings.warn(
                f"desirable_weight={self.desirable_weight} / undesirable_weight={self.undesirable_weight} were given, "
                "so loss_aversion is 'manual' (set loss_aversion='manual' to silence this message).",
                UserWarning,
                stacklevel=3,
            )
            self.loss_aversion = "manual"
        if self.train_sampling_strategy not in STRATEGIES:
            raise ValueError(
                f"`train_sampling_strategy` must be one of {', '.join(map(repr, STRATEGIES))}, got "
                f"{self.train_sampling_strategy!r}."
            )
        if self.kl_pairing not in ("batch", "dataset"):
            raise ValueError(f"`kl_pairing` must be 'batch' or 'dataset', got {self.kl_pairing!r}.")
        if self.on_nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"`on_nonfinite_loss` must be 'raise' or 'skip', got {self.on_nonfinite_loss!r}.")
        limit = self.max_consecutive_nonfinite_steps
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(
                f"`max_consecutive_nonfinite_steps` must be a whole number of steps >= 1, got {limit!r}: it is how many "
                "optimizer steps in a row may be skipped for a NaN/inf loss before the run stops."
            )
        check_features(self)  # scores to labels, truncation, humanline and reference sync
        self._given, self._resolved = given, self._field_values()

    def _field_values(self) -> dict:
        # Shallow copies of lists and dicts, so that one changed in place after construction counts as changed.
        return {f.name: copy.copy(getattr(self, f.name)) for f in fields(self) if f.init}

    def refresh(self) -> KTOExtConfig:
        """Re-derive every resolved setting from the fields as they are now; the trainers call it when they start.

        A field set after construction (`args.desirable_weight = 3.5`) counts as if it had been given to the
        constructor: the settings derived from it (loss_aversion "auto" -> "manual", bf16 left unset, the mixed
        precision transformers derives from bf16/fp16, activation_checkpointing and its old name, ...) are derived
        again and every check runs again. Nothing changed: nothing happens. Returns `self`, updated in place.

        Raises:
            ValueError: a value set after construction that the constructor would refuse (same message).
        """
        resolved = self.__dict__.get("_resolved")
        if resolved is None:  # e.g. unpickled from a version that kept no record: nothing to compare with
            return self
        current = self._field_values()
        changed = {k for k, v in current.items() if not _same(v, resolved.get(k))}
        if not changed:
            return self
        values = {k: current[k] if k in changed else self._given[k] for k in current}
        if not changed & {"loss_aversion", "desirable_weight", "undesirable_weight"}:
            values["loss_aversion"] = current["loss_aversion"]  # resolved already; its warning was given then
        fresh = type(self)(**values)
        self.__dict__.clear()  # nothing stale is kept: `bf16_from_default`, the cached device, `mixed_precision`
        self.__dict__.update(fresh.__dict__)
        return self


def _same(a, b) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # a value without a plain equality
        return False


def as_ext_config(args: KTOConfig | None, model) -> KTOExtConfig:
    """`args` as a `KTOExtConfig`: itself, refreshed (`KTOExtConfig.refresh`); a default one named after the model
    when None; a plain `trl.KTOConfig`'s values with the added fields at their defaults. Raises TypeError for anything
    else, ValueError for a field set after construction to a value the constructor refuses."""
    if isinstance(args, KTOExtConfig):
        return args.refresh()  # fields set after construction are honoured (or refused) as if given to it
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        return KTOExtConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-KTO")
    if isinstance(args, KTOConfig):
        # A plain TRL config keeps its values; the added fields take their defaults.
        values = {k: v for k, v in args.to_dict().items() if k in KTOExtConfig.__dataclass_fields__}
        values = {k: getattr(args, k) for k in values if KTOExtConfig.__dataclass_fields__[k].init}
        return KTOExtConfig(**values)
    raise TypeError(f"`args` must be a KTOExtConfig or trl.KTOConfig, got {type(args).__name__}.")
