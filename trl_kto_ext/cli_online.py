"""`trl-kto-ext online`: train with OnlineKTOTrainer from a YAML config and/or flags (reward functions by dotted path)."""

from __future__ import annotations

from . import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)

import sys
from dataclasses import dataclass, field, fields

from trl import ModelConfig, ScriptArguments

from .cli import (
    HELP_GROUPS,
    HELP_TEXTS,
    TINY_DATASET,
    TINY_MODEL,
    _Parser,
    as_flags,
    format_config,
    parse_args,
    resolve_model_path,
)
from .cli_config import PROG, _fail
from .cli_help import HelpAllAction, HelpFormatter, group_options
from .online_config import OnlineKTOConfig

DESCRIPTION = f"""Online KTO (OnlineKTOTrainer): sample completions from the policy, label them with reward functions,
train with the KTO loss. Every option can also be set in a YAML file, --config FILE; flags override the file.
Offline default: --model_name_or_path {TINY_MODEL} --dataset_name {TINY_DATASET} --reward_funcs
trl_kto_ext.tiny.exact_answer_reward (configs/online-tiny.yaml)."""


@dataclass
class OnlineScriptArguments(ScriptArguments):
    """TRL's ScriptArguments plus the reward functions and the prompt column."""

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward functions: dotted paths to callables (e.g. trl_kto_ext.tiny.exact_answer_reward) or "
            "names/paths of sequence-classification reward models."
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
OTHER_GROUP = "all other options (transformers TrainingArguments, TRL KTOConfig)"


def make_parser(prog: str | None = f"{PROG} online") -> _Parser:
    """TrlParser over (OnlineScriptArguments, OnlineKTOConfig, ModelConfig); --help lists the online options first."""
    parser = _Parser(
        (OnlineScriptArguments, OnlineKTOConfig, ModelConfig), prog=prog, usage=f"{prog} [--config FILE] [--OPTION VALUE ...]",
        description=DESCRIPTION, allow_abbrev=False, formatter_class=HelpFormatter,
    )  # fmt: skip
    parser.add_argument("--help-all", "--help_all", action=HelpAllAction, help="Show every option and exit.")
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of `option: value` lines (any option below); flags override it."
    )
    parser.add_argument(
        "--print-config", "--print_config", action="store_true", help="Print the resolved config as YAML and exit."
    )
    groups = {"online KTO": ONLINE_GROUP}
    online = set(ONLINE_GROUP.split())
    for title, names in HELP_GROUPS.items():
        kept = [n for n in names.split() if n not in online and n not in ("prompt_column",)]
        if title == "data":
            kept = [n for n in kept if n in {f.name for f in fields(OnlineScriptArguments)}]
        groups[title] = " ".join(kept)
    group_options(parser, groups, OTHER_GROUP, HELP_TEXTS, more=f"run `{PROG} online --help-all` to list them")
    return parser


def load_prompt_dataset(script_args, seed: int):
    """(train prompts, tiny held-out (prompts, answers) or None); SystemExit with a one-line message."""
    name, split = script_args.dataset_name, script_args.dataset_train_split
    if name == TINY_DATASET:
        from .tiny import heldout_prompts, make_prompt_dataset

        prompts = make_prompt_dataset(split="train")
        if script_args.tiny_train_prompts is not None:
            prompts = prompts.shuffle(seed=seed).select(range(script_args.tiny_train_prompts))
        return prompts, heldout_prompts()
    if not name:
        _fail(f"no dataset: set dataset_name (a data file or folder, a Hub id, or {TINY_DATASET}).")
    from .data import load_raw_dataset

    column = script_args.prompt_column
    try:
        dataset = load_raw_dataset(name, split=split, dataset_config=script_args.dataset_config, text_columns=[column])
    except (FileNotFoundError, ValueError) as err:
        _fail(f"could not load the prompts from {name!r}: {as_flags(str(err))}")
    if column != "prompt" and column in dataset.column_names:
        dataset = dataset.rename_column(column, "prompt")
    if "prompt" not in dataset.column_names:
        _fail(f"{name!r} has no column {column!r} (columns: {dataset.column_names}); set --prompt_column.")
    return dataset, None


def train(script_args, training_args, model_args, command: list[str] | None = None) -> str:
    """Run online KTO as configured; returns the output_dir. `command` (argv) is recorded in the model card."""
    from .cli_run import run
    from .online import OnlineKTOTrainer

    if not script_args.reward_funcs:
        _fail("no reward function: set reward_funcs (e.g. [trl_kto_ext.tiny.exact_answer_reward]).")
    resolve_model_path(model_args.model_name_or_path, build_tiny=False)  # a wrong path fails before data loading
    prompts, heldout = load_prompt_dataset(script_args, training_args.seed)
    return run(
        OnlineKTOTrainer, script_args, training_args, model_args, command, heldout, method="online KTO",
        reward_funcs=list(script_args.reward_funcs), train_dataset=prompts,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args, print_config = parse_args(argv, make_parser())
    if print_config:
        print(format_config(script_args, training_args, model_args), end="")
        return 0
    train(script_args, training_args, model_args, command=[PROG, "online", *argv])
    return 0
