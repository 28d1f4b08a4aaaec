"""`trl-kto-ext online`: train with OnlineKTOTrainer from a YAML config and/or flags (reward functions by dotted path)."""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)

import os
import sys
from dataclasses import dataclass, field, fields

from trl import ModelConfig, ScriptArguments, TrlParser

from trl_kto_ext.cli.help import help_groups
from trl_kto_ext.cli.parsing import (
    PROG,
    _fail,
    as_flags,
    config_path,
    format_config,
    missing_file_hint,
    new_parser,
    one_line_warnings,
    parse_args,
)
from trl_kto_ext.cli.run import resolve_model_path
from trl_kto_ext.models import TINY_DATASET, TINY_MODEL
from trl_kto_ext.online.config import OnlineKTOConfig

DESCRIPTION = f"""Online KTO (OnlineKTOTrainer): sample completions from the policy, label them with reward functions,
train with the KTO loss. Every option can also be set in a YAML file, --config FILE; flags override the file.
Offline default: --model_name_or_path {TINY_MODEL} --dataset_name {TINY_DATASET} --reward_funcs
trl_kto_ext.models.tiny.exact_answer_reward (configs/online-tiny.yaml)."""


@dataclass
class OnlineScriptArguments(ScriptArguments):
    """TRL's ScriptArguments plus the reward functions and the prompt column."""

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward functions: dotted paths to callables (e.g. trl_kto_ext.models.tiny.exact_answer_reward; "
            "a module that is not installed is found as MODULE.py next to the --config file or in the working "
            "directory) or names/paths of sequence-classification reward models."
        },
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    tiny_train_prompts: int | None = field(
        default=None, metadata={"help": f"Train prompts of {TINY_DATASET} (None: all 900 train-split prompts)."}
    )


ONLINE_GROUP = (
    "reward_funcs reward_weights label_mode desirable_threshold num_generations max_completion_length temperature "
    "top_p top_k loss_aversion_window prompt_column tiny_train_prompts"
)


def make_parser(prog: str | None = f"{PROG} online") -> TrlParser:
    """TrlParser over (OnlineScriptArguments, OnlineKTOConfig, ModelConfig); --help lists the online options first."""
    online = set(ONLINE_GROUP.split())
    data = " ".join(f.name for f in fields(OnlineScriptArguments) if f.name not in online | {"ignore_bias_buffers"})
    groups = {"online KTO": ONLINE_GROUP}
    groups.update(
        {
            title: " ".join(n for n in names.split() if n not in online)
            for title, names in help_groups(data, ModelConfig).items()
        }
    )
    usage = f"{prog} [--config FILE] [--OPTION VALUE ...]"
    return new_parser((OnlineScriptArguments, OnlineKTOConfig, ModelConfig), prog, usage, DESCRIPTION, groups)


def load_prompt_dataset(script_args, seed: int):
    """(train prompts, tiny held-out (prompts, answers) or None); SystemExit with a one-line message."""
    name, split = script_args.dataset_name, script_args.dataset_train_split
    if name == TINY_DATASET:
        from trl_kto_ext.models.tiny import heldout_prompts, make_prompt_dataset

        prompts = make_prompt_dataset(split="train")
        if script_args.tiny_train_prompts is not None:
            prompts = prompts.shuffle(seed=seed).select(range(script_args.tiny_train_prompts))
        return prompts, heldout_prompts()
    if not name:
        _fail(f"no dataset: set dataset_name (a data file or folder, a Hub id, or {TINY_DATASET}).")
    from trl_kto_ext.data.loading import load_raw_dataset

    column = script_args.prompt_column
    try:
        dataset = load_raw_dataset(name, split=split, dataset_config=script_args.dataset_config, text_columns=[column])
    except (FileNotFoundError, ValueError) as err:
        _fail(f"could not load the prompts from {name!r}: {as_flags(str(err))}{missing_file_hint(err)}")
    if column != "prompt" and column in dataset.column_names:
        dataset = dataset.rename_column(column, "prompt")
    if "prompt" not in dataset.column_names:
        _fail(f"{name!r} has no column {column!r} (columns: {dataset.column_names}); set --prompt_column.")
    return dataset, None


def train(
    script_args, training_args, model_args, command: list[str] | None = None, config_dir: str | None = None
) -> str:
    """Run online KTO as configured; returns the output_dir. `command` (argv) is recorded in the model card. A reward
    function's module that is not installed is looked for in `config_dir` (the --config file's folder), then in the
    working directory."""
    from trl_kto_ext.cli.run import run
    from trl_kto_ext.online.rewards import import_reward_function, is_dotted_path
    from trl_kto_ext.online.trainer import OnlineKTOTrainer

    if not script_args.reward_funcs:
        _fail("no reward function: set reward_funcs (e.g. [trl_kto_ext.models.tiny.exact_answer_reward]).")
    search_dirs = [d for d in (config_dir, os.getcwd()) if d]
    try:
        reward_funcs = [
            import_reward_function(f, search_dirs) if is_dotted_path(f) else f for f in script_args.reward_funcs
        ]
    except ValueError as err:
        _fail(str(err))
    resolve_model_path(model_args.model_name_or_path, build_tiny=False)  # a wrong path fails before data loading
    prompts, heldout = load_prompt_dataset(script_args, training_args.seed)
    return run(
        OnlineKTOTrainer, script_args, training_args, model_args, command, heldout, method="online KTO",
        reward_funcs=reward_funcs, train_dataset=prompts,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    one_line_warnings()
    script_args, training_args, model_args, print_config = parse_args(argv, make_parser())
    if print_config:
        print(format_config(script_args, training_args, model_args), end="")
        return 0
    config = config_path(argv)
    config_dir = os.path.dirname(os.path.abspath(config)) if config else None
    train(script_args, training_args, model_args, command=[PROG, "online", *argv], config_dir=config_dir)
    return 0
