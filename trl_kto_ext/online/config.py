"""OnlineKTOConfig: KTOExtConfig plus the sampling, reward and labelling settings of online KTO."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl_kto_ext.config import KTOExtConfig
from trl_kto_ext.online.one_class import ONE_CLASS_MODES
from trl_kto_ext.online.rewards import LABEL_MODES


@dataclass
class OnlineKTOConfig(KTOExtConfig):
    r"""
    Configuration for [`OnlineKTOTrainer`]. Every field of [`KTOExtConfig`] keeps its meaning (beta, loss aversion,
    pairing seed, LoRA/QLoRA through the trainer's `peft_config`, logging); the names of the sampling fields follow
    TRL's `GRPOConfig`.

    `per_device_train_batch_size` counts completions, as in GRPO: each step samples
    `per_device_train_batch_size / num_generations` prompts, `num_generations` completions each.

    Args:
        num_generations (`int`, defaults to `4`):
            Completions sampled per prompt at each step (>= 1; `"relative"` labels need >= 2).
        max_completion_length (`int`, defaults to `64`):
            Maximum number of generated tokens per completion.
        temperature (`float`, defaults to `0.5`), top_p (`float`, defaults to `1.0`), top_k (`int`, defaults to `0`):
            Sampling settings of `model.generate` (top_k 0: off). The temperature is below GRPO's 1.0 because KTO
            learns only from prompts whose samples get both labels: on two-digit addition, SmolLM2-135M-Instruct's
            samples (4 per prompt, 48-64 prompts; greedy: 27% right) were right 6% / 7% / 15% / 19% of the time at
            1.0 / 0.7 / 0.5 / 0.3, and 19% / 22% / 31% / 23% of its prompts got both labels. Raise it for a strong
            model whose samples are nearly all right.
        reward_weights (`list[float]` or `None`):
            Weight of each reward function in the summed reward (all 1 when None).
        label_mode (`str`, defaults to `"threshold"`):
            `"threshold"`: desirable iff reward >= `desirable_threshold` (verifiers, rules). `"relative"`: desirable
            iff reward > the mean of the prompt's own samples; ties with the mean are undesirable, and a prompt whose
            samples all have the same reward is left out of the step (it carries no preference).
        desirable_threshold (`float`, defaults to `0.5`):
            The threshold of `"threshold"` labels.
        one_class (`str`, defaults to `"skip"`):
            `"skip"`: a prompt whose `num_generations` samples all got the same label is left out of the step (as GRPO
            gives such a group zero advantage), and a step left with no desirable or no undesirable row makes no
            update; both are counted (`count/one_class_prompts`, `skipped/no_preference_steps`) and said once per
            run. `"train"`: every labelled row is trained, each against z0, as offline. See `online.one_class`.
        loss_aversion_window (`int`, defaults to `16`):
            With `loss_aversion="auto"`, lambda_D = target * n_U / n_D over the labelled completions of the last
            `loss_aversion_window` steps (the current one included), lambda_U = 1.
    """

    num_generations: int = field(default=4, metadata={"help": "Completions sampled per prompt at each step."})
    max_completion_length: int = field(default=64, metadata={"help": "Maximum generated tokens per completion."})
    temperature: float = field(
        default=0.5,
        metadata={
            "help": "Sampling temperature (below GRPO's 1.0: a weak model's samples must be right "
            "often enough for prompts to get both labels)."
        },
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function in the summed reward (all 1 when unset)."}
    )
    label_mode: str = field(
        default="threshold",
        metadata={
            "help": "'threshold': desirable iff reward >= desirable_threshold. 'relative': desirable iff reward > the "
            "mean reward of the prompt's own samples (ties undesirable; all-equal groups left out).",
            "choices": list(LABEL_MODES),
        },
    )
    desirable_threshold: float = field(
        default=0.5, metadata={"help": "Reward at or above which a sample is desirable."}
    )
    one_class: str = field(
        default="skip",
        metadata={
            "help": "'skip': a prompt whose samples all got one label is left out of the step, and a step left with no "
            "desirable or no undesirable sample makes no update (counted, said once). 'train': train on them as "
            "offline.",
            "choices": list(ONE_CLASS_MODES),
        },
    )
    loss_aversion_window: int = field(
        default=16, metadata={"help": "Steps whose label counts set lambda_D in 'auto' loss aversion."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_generations, int) or self.num_generations < 1:
            raise ValueError(
                f"`num_generations` must be an integer >= 1 (completions sampled per prompt), got "
                f"{self.num_generations!r}."
            )
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"`label_mode` must be one of {LABEL_MODES}, got {self.label_mode!r}.")
        if self.one_class not in ONE_CLASS_MODES:
            raise ValueError(f"`one_class` must be one of {ONE_CLASS_MODES}, got {self.one_class!r}.")
        if self.label_mode == "relative" and self.num_generations < 2:
            raise ValueError(
                "label_mode='relative' compares the samples of one prompt with each other and needs num_generations "
                ">= 2; use label_mode='threshold' with a single sample per prompt."
            )
        size = self.per_device_train_batch_size
        if size % self.num_generations:
            raise ValueError(
                f"`per_device_train_batch_size` ({size}) counts completions and must be a multiple of "
                f"num_generations ({self.num_generations}): each prompt of a batch gets num_generations completions."
            )
        if self.loss_type != "apo_zero_unpaired" and self.per_device_train_batch_size // self.num_generations < 2:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} with num_generations="
                f"{self.num_generations} samples a single prompt per step, but the KL rows pair each prompt with a "
                "completion sampled for a different prompt. Use per_device_train_batch_size >= 2 * num_generations."
            )
        if self.max_completion_length < 1:
            raise ValueError(f"`max_completion_length` must be >= 1, got {self.max_completion_length}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")
        if self.loss_aversion_window < 1:
            raise ValueError(f"`loss_aversion_window` must be >= 1 step, got {self.loss_aversion_window}.")
        if self.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs cannot be used online: the completions are sampled during training, so there "
                "is nothing to precompute. Leave it False."
            )
        if self.kl_pairing != "batch":
            raise ValueError("Online KTO pairs the KL rows inside each sampled batch: `kl_pairing` must be 'batch'.")
        if self.score_weighting != "none" or self.truncation_mode != "keep_start":
            raise ValueError(
                "score_weighting and truncation_mode apply to offline datasets (a `score` column; long tokenized "
                "prompts); online KTO labels its own samples and renders each prompt once: leave them at their "
                "defaults ('none', 'keep_start')."
            )
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
