"""A readable --help for a TrlParser: options in titled groups, first sentences only, the rest behind --help-all."""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import fields

from trl_kto_ext.models import SMOLLM2_MODEL, TINY_DATASET, TINY_MODEL

# --help shows these groups, in this order ([`help_groups`]); every other option is listed by --help-all only.
KTO_OPTIONS = (
    "beta loss_aversion loss_aversion_target desirable_weight undesirable_weight kl_pairing kl_pairing_seed "
    "kl_subset_size loss_type max_length precompute_ref_log_probs on_nonfinite_loss train_sampling_strategy"
)
TRAINING_OPTIONS = (
    "output_dir max_steps num_train_epochs learning_rate lr_scheduler_type warmup_steps "
    "per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps optim weight_decay "
    "max_grad_norm use_cpu bf16 fp16 activation_checkpointing seed logging_steps eval_strategy eval_steps "
    "save_strategy save_steps report_to resume_from_checkpoint model_init_kwargs"
)
OTHER_GROUP = "all other options (transformers TrainingArguments, TRL KTOConfig)"
# TRL/transformers help texts that say something untrue for these commands.
HELP_TEXTS = {
    "dataset_name": f"A Hub dataset id, a local folder (save_to_disk or data files), a .jsonl/.json/.csv/.parquet file, "
    f"or {TINY_DATASET} (the embedded offline addition data).",
    "dataset_config": "Dataset configuration name (the `name` argument of `datasets.load_dataset`).",
    "dataset_streaming": "Read the dataset lazily (an IterableDataset; max_steps is required). The loss aversion is "
    "counted from its first loss_aversion_stream_rows rows.",
    "model_name_or_path": f"A Hub model id, a local folder, {TINY_MODEL} (the embedded 0.5M-parameter model, built "
    f"and cached on first use) or {SMOLLM2_MODEL} (SmolLM2-135M-Instruct, fetched from PyPI and converted once).",
}


def help_groups(data_options: str, model_config: type) -> dict[str, str]:
    """The --help groups of a command, in order: KTO, its `data_options`, the fields of `model_config`, training."""
    return {
        "KTO": KTO_OPTIONS,
        "data": data_options,
        "model/LoRA": " ".join(f.name for f in fields(model_config)),
        "common training options": TRAINING_OPTIONS,
    }


# Groups argparse makes itself; options never moved out of them (-h, --config, ...).
_KEEP = ("help", "help_all", "config", "print_config", argparse.SUPPRESS)


def _metavar(action: argparse.Action) -> str:
    if action.choices:
        return "NAME"
    if action.metavar:
        return str(action.metavar)
    name = getattr(action.type, "__name__", "VALUE")
    return {"string_to_bool": "BOOL", "str": "STR", "int": "INT", "float": "FLOAT"}.get(name, "VALUE")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks, shows every default, and names each option once (no dashed alias)."""

    def __init__(self, prog, indent_increment=2, max_help_position=36, width=None):
        width = width or min(120, shutil.get_terminal_size().columns - 2)
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return action.option_strings[0]
        if action.choices and len(action.choices) <= 6:
            return f"{action.option_strings[0]} {{{','.join(map(str, action.choices))}}}"
        return f"{action.option_strings[0]} {_metavar(action)}"


class ShortHelpFormatter(HelpFormatter):
    """--help: the first sentence of each help text; --help-all shows them whole, with every choice."""

    def _get_help_string(self, action):
        first = re.split(r"(?<=[a-z0-9)`'])\. (?=[A-Z(`])", action.help or "", maxsplit=1)[0].rstrip(".") + "."
        if action.choices and len(action.choices) > 6:
            first += f" One of {len(action.choices)} names (--help-all lists them)."
        short = argparse.Action(action.option_strings, action.dest, help=first, default=action.default)
        return super()._get_help_string(short)


class HelpAllAction(argparse.Action):
    """`--help-all`: the help with every group and every option, whole."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.show_all = True
        parser.print_help()
        parser.exit()


class GroupedHelpMixin:
    """For an ArgumentParser subclass: plain --help hides the options of the group titled `hidden_group`."""

    show_all = False
    hidden_group: str | None = None

    def format_help(self) -> str:
        other = next((g for g in self._action_groups if g.title == self.hidden_group), None)
        if other is None or self.show_all:
            return super().format_help()
        hidden, other._group_actions = other._group_actions, []
        formatter_class, self.formatter_class = self.formatter_class, ShortHelpFormatter
        try:
            return super().format_help()
        finally:
            other._group_actions, self.formatter_class = hidden, formatter_class


def group_options(
    parser: argparse.ArgumentParser, groups: dict[str, str], other: str, help_texts: dict[str, str], more: str
) -> None:
    """Move each option into its titled group (`groups`: title -> space-separated dests, in display order), the rest
    into the group titled `other`, which plain --help shows as one line ("N more options: `more`"). `help_texts`
    replaces the help of the named dests."""
    group_of = {name: title for title, names in groups.items() for name in names.split()}
    source = parser._optionals
    titled = {title: parser.add_argument_group(title) for title in groups}
    rest = [a for a in source._group_actions if a.dest not in _KEEP and a.dest not in group_of]
    hidden = parser.add_argument_group(other, f"{len(rest)} more options: {more}.")
    for action in list(source._group_actions):
        action.help = help_texts.get(action.dest, action.help)
        if action.dest in _KEEP:
            continue
        source._group_actions.remove(action)
        (titled[group_of[action.dest]] if action.dest in group_of else hidden)._group_actions.append(action)
    for title, group in titled.items():
        order = groups[title].split()
        group._group_actions.sort(key=lambda a: order.index(a.dest))
    parser.hidden_group = other
