"""What online KTO does with samples that carry no contrast: a prompt whose samples all got one label, a step left
with one class.

Why they are skipped by default. KTO's signal is the comparison of each row's implied reward r(x, y) with the
reference point z0, the policy's KL from the reference (Ethayarajh et al., 2024). Online, the rows are the policy's
own samples: over them the expected gradient of log pi(y|x) is zero for every prompt (E_{y~pi}[grad log pi(y|x)] = 0),
so a prompt whose samples all carry one label gives an update that is zero in expectation; what remains in a finite
sample is noise plus a systematic push of the sampled completions away (all undesirable) or towards them (all
desirable). Pushing every sample of a weak model down moves probability to text it never samples: with
SmolLM2-135M-Instruct at temperature 1.0 every sample of two-digit addition was wrong, every step had only undesirable
rows, and greedy accuracy fell from 0.22 to 0.02. GRPO gives such a group zero advantage, and DAPO's dynamic sampling
drops it (Yu et al., 2025, arXiv 2503.14476); `one_class="skip"` does the same for KTO, and a step left with no
desirable or no undesirable row makes no update. `one_class="train"` keeps KTO's offline behaviour (each row compared
with z0, whatever the other rows are).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

ONE_CLASS_MODES = ("skip", "train")


class GroupLabels(NamedTuple):
    """Labels after the one-class rule, with the number of prompts it left out by the label they all had."""

    labels: list[bool | None]
    all_desirable: int
    all_undesirable: int


def drop_one_class_groups(labels: Sequence[bool | None], group_size: int) -> GroupLabels:
    """Leaves out (None) every group of `group_size` consecutive rows whose labelled rows all have one label.

    Groups of one row are kept (a single sample has no group to compare with; the step-level rule applies then).
    Rows already None stay None. Example: `[T, T, F, F, F, F, None, T, F]` in groups of 3 -> `[T, T, F, None x 3,
    None, T, F]`, one group left out, all undesirable."""
    if len(labels) % group_size:
        raise ValueError(f"got {len(labels)} labels, not a multiple of the group size {group_size}.")
    out, n_d, n_u = list(labels), 0, 0
    if group_size < 2:
        return GroupLabels(out, 0, 0)
    for start in range(0, len(out), group_size):
        kept = {label for label in out[start : start + group_size] if label is not None}
        if len(kept) == 1:
            n_d, n_u = (n_d + 1, n_u) if kept == {True} else (n_d, n_u + 1)
            out[start : start + group_size] = [None] * group_size
    return GroupLabels(out, n_d, n_u)


def skipped_step_message(step: int, n_desirable: int, n_undesirable: int, n_samples: int, args) -> str:
    """The line said once per run at the first step that makes no update for want of one class."""
    if n_desirable == 0 and n_undesirable == 0:
        what = f"no prompt of step {step} had both a desirable and an undesirable sample among its {n_samples}"
    else:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        what = f"step {step} had no {missing} sample among its {n_desirable + n_undesirable} labelled samples"
    bar = (
        f"reward >= desirable_threshold={args.desirable_threshold}"
        if args.label_mode == "threshold"
        else "reward above its prompt's mean"
    )
    return (
        f"Online KTO: {what} (desirable: {bar}); the step made no update: on the policy's own samples one label carries "
        "no contrast, and pushing every sample down moves probability to text the model never samples. Such steps "
        "are counted in `skipped/no_preference_steps`, prompts whose samples share one label in "
        "`count/one_class_prompts` (said once). If it repeats: lower `temperature` (samples too random to be right) "
        "or raise `num_generations`, give a graded reward with label_mode='relative', or check the reward function "
        "(for chat prompts `completions` are lists of messages, not strings); one_class='train' trains on them anyway."
    )


def no_update_advice(args, rewards_seen: tuple[float, float] | None) -> str:
    """Why a run whose every step was a no-preference step trained nothing, and the likely fixes (appended to the
    end-of-run warning, `trl_kto_ext.training.guards.no_update_message`). `rewards_seen`: (lowest, highest) reward of
    the run's samples."""
    if rewards_seen is None:
        seen = ""
    elif rewards_seen[0] == rewards_seen[1]:
        seen = (
            f" Every sample of the run got the same reward, {rewards_seen[0]:g}: a reward function that never varies."
        )
    else:
        seen = f" The samples' rewards ranged from {rewards_seen[0]:g} to {rewards_seen[1]:g}."
    bar = (
        f"desirable_threshold={args.desirable_threshold} splits them"
        if args.label_mode == "threshold"
        else "label_mode='relative' compares each with its prompt's mean"
    )
    return (
        f"Online KTO trains only on prompts whose samples got both labels ({bar}).{seen} Likely fixes: check what "
        "the reward function receives (`completions` are strings for text prompts, but lists of messages "
        "[{'role': 'assistant', 'content': ...}] for conversational prompts: compare `completion[0]['content']`); "
        f"lower `temperature` (now {args.temperature}) or raise `num_generations` (now {args.num_generations}) so "
        "that a prompt's samples differ; give a graded reward with label_mode='relative'; or one_class='train'."
    )


def train_one_class_message(loss_aversion: str) -> str:
    """The line said once per run when `one_class="train"` trains a step that has one class only."""
    weights = (
        "auto lambda cannot balance a missing class: the weights of the last window that held both classes are kept "
        "(1 and 1 before any)"
        if loss_aversion == "auto"
        else "the manual desirable_weight / undesirable_weight apply as given"
    )
    return (
        "Online KTO (one_class='train'): a step with one class only is trained, each row against z0 alone; "
        f"{weights}. On a model whose samples are nearly all wrong this lowers every sample; one_class='skip' "
        "(the default) leaves such steps out."
    )
