"""`trl-kto-ext`: train with KTOExtTrainer from a YAML config and/or flags, shaped like TRL's `trl kto` script."""

from __future__ import annotations

from . import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)
import contextlib
import enum
import functools
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .cli_config import PROG, _fail, check_config, check_flags, load_yaml_config
from .cli_help import GroupedHelpMixin, HelpAllAction, HelpFormatter, group_options
from .peft_utils import without_bitsandbytes

with without_bitsandbytes():  # peft (through TrainingArguments) would import it; train() does when 4/8-bit is set
    from trl import ModelConfig, ScriptArguments, TrlParser

    from .config import KTOExtConfig

COLUMNS = ("prompt", "completion", "label", "chosen", "rejected")
TINY_MODEL = "tiny"
TINY_DATASET = "tiny-arithmetic"
DESCRIPTION = f"""Train a model with KTO (KTOExtTrainer) from a YAML config and/or flags.

commands:
  {PROG} --config FILE [--OPTION VALUE ...]   train; every option below can be a key of the YAML file, flags override
  {PROG} plot OUTPUT_DIR [--out FILE.png]     draw the training curves of a run (training_curves.png)
  {PROG} online --config FILE [...]           online KTO: sample, label with reward functions, train (`online --help`)

offline example: {PROG} --config configs/tiny-cpu.yaml --max_steps 20
  (model_name_or_path: {TINY_MODEL} and dataset_name: {TINY_DATASET} are the embedded tiny model and data)"""
USAGE = f"{PROG} [--config FILE] [--print-config] [--OPTION VALUE ...]\n       {PROG} plot OUTPUT_DIR [--out FILE.png]"


@dataclass
class KTOScriptArguments(ScriptArguments):
    """TRL's ScriptArguments plus the column mapping, class subsampling and held-out split of `trl_kto_ext.data`."""

    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    completion_column: str = field(default="completion", metadata={"help": "Column holding the completion."})
    label_column: str = field(default="label", metadata={"help": "Column holding the desirable/undesirable label."})
    chosen_column: str = field(default="chosen", metadata={"help": "Chosen column of paired data (unpaired on load)."})
    rejected_column: str = field(default="rejected", metadata={"help": "Rejected column of paired data."})
    desirable_fraction: float = field(default=1.0, metadata={"help": "Share of desirable training rows to keep."})
    undesirable_fraction: float = field(default=1.0, metadata={"help": "Share of undesirable training rows to keep."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share held out for eval if no test split."})
    tiny_train_rows: int = field(default=2048, metadata={"help": f"Training rows of the {TINY_DATASET} dataset."})
    tiny_eval_rows: int = field(default=256, metadata={"help": f"Eval rows of {TINY_DATASET} (held-out prompts)."})


# --help shows these groups, in this order; every other option is listed by --help-all only.
HELP_GROUPS = {
    "KTO": (
        "beta loss_aversion loss_aversion_target desirable_weight undesirable_weight kl_pairing kl_pairing_seed "
        "kl_subset_size loss_type max_length precompute_ref_log_probs on_nonfinite_loss train_sampling_strategy"
    ),
    "data": " ".join(f.name for f in fields(KTOScriptArguments) if f.name != "ignore_bias_buffers"),
    "model/LoRA": " ".join(f.name for f in fields(ModelConfig)),
    "common training options": (
        "output_dir max_steps num_train_epochs learning_rate lr_scheduler_type warmup_steps "
        "per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps optim weight_decay "
        "max_grad_norm use_cpu bf16 fp16 activation_checkpointing seed logging_steps eval_strategy eval_steps "
        "save_strategy save_steps report_to resume_from_checkpoint model_init_kwargs"
    ),
}
OTHER_GROUP = "all other options (transformers TrainingArguments, TRL KTOConfig)"
# TRL/transformers help texts that say something untrue for this command.
HELP_TEXTS = {
    "dataset_name": f"A Hub dataset id, a local folder (save_to_disk or data files), a .jsonl/.json/.csv/.parquet file, "
    f"or {TINY_DATASET} (the embedded offline addition data).",
    "dataset_config": "Dataset configuration name (the `name` argument of `datasets.load_dataset`).",
    "dataset_streaming": "Read the dataset lazily (an IterableDataset; max_steps is required). The loss aversion is "
    "counted from its first loss_aversion_stream_rows rows.",
    "model_name_or_path": f"A Hub model id, a local folder, or {TINY_MODEL} (the embedded 0.5M-parameter model, built "
    "and cached on first use).",
}


class _Parser(GroupedHelpMixin, TrlParser):
    def error(self, message):  # argparse would print the whole (very long) usage first
        raise SystemExit(f"{PROG}: error: {message}\nRun `{PROG} --help` to list the options.")


def make_parser(prog: str | None = PROG) -> TrlParser:
    """TrlParser over (KTOScriptArguments, KTOExtConfig, ModelConfig) whose --help lists the KTO options first."""
    parser = _Parser(
        (KTOScriptArguments, KTOExtConfig, ModelConfig),
        prog=prog,
        usage=USAGE,
        description=DESCRIPTION,
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--help-all", "--help_all", action=HelpAllAction, help="Show every option and exit.")
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of `option: value` lines (any option below); flags override it."
    )
    parser.add_argument(
        "--print-config", "--print_config", action="store_true", help="Print the resolved config as YAML and exit."
    )
    group_options(parser, HELP_GROUPS, OTHER_GROUP, HELP_TEXTS, more=f"run `{PROG} --help-all` to list them")
    return parser


def parse_args(argv: list[str], parser: TrlParser | None = None) -> tuple[Any, ...]:
    """(script_args, training_args, model_args, print_config), from `--config FILE` and flags like `trl kto`."""
    parser = parser or make_parser()
    args = list(argv)
    i = next((i for i, a in enumerate(args) if a == "--config" or a.startswith("--config=")), None)
    if i is not None:
        path = args.pop(i).partition("=")[2] or (args.pop(i) if i < len(args) else _fail("--config needs a file."))
        config = load_yaml_config(path)
        env = config.pop("env", {})
        if not isinstance(env, dict):
            _fail(f"`env` in {path} must be a mapping of environment variables.")
        os.environ.update({str(k): str(v) for k, v in env.items()})
        check_config(config, parser, path)
        parser.set_defaults_with_config(**config)
    check_flags(args, parser)
    hardware_check = contextlib.nullcontext()
    if {"--print-config", "--print_config"} & set(args):  # print a GPU config (bf16: true) on any machine
        hardware_check = _bf16_reported_available()
    try:
        with hardware_check:
            *dataclasses, extra = parser.parse_args_into_dataclasses(args=args)
    except (ValueError, TypeError) as err:  # a dataclass __post_init__ check (e.g. loss_aversion_target range)
        _fail(str(err))
    return (*dataclasses, extra.print_config)


@contextlib.contextmanager
def _bf16_reported_available():
    """transformers' bf16 hardware check answers True inside the block (for --print-config only: no model runs)."""
    import transformers.training_args as training_args_module

    saved = training_args_module.is_torch_bf16_gpu_available
    training_args_module.is_torch_bf16_gpu_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        training_args_module.is_torch_bf16_gpu_available = saved


def format_config(script_args, training_args, model_args) -> str:
    """All dataclass values as one YAML mapping (usable again with --config), grouped by dataclass."""
    parts = []
    for args in (script_args, model_args, training_args):
        values = args.to_dict() if hasattr(args, "to_dict") else {f.name: getattr(args, f.name) for f in fields(args)}
        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}
        parts.append(f"# --- {type(args).__name__} ---\n" + yaml.safe_dump(values, sort_keys=False))
    return "\n".join(parts)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def get_kbit_device_map() -> dict[str, int] | None:
    """TRL's `get_kbit_device_map` (gone from TRL 1.x): the local process' GPU, or None without CUDA."""
    import torch
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def load_datasets(script_args, training_args):
    """(train, eval or None, tiny_heldout or None) from `dataset_name`; SystemExit with the loader's message."""
    from .data import count_labels, load_unpaired_dataset, subsample_class
    from .data import logger as data_logger
    from .eval_split import train_eval_split
    from .loss_aversion import resolve_loss_aversion
    from .validation import check_dataset

    want_eval = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    if script_args.dataset_streaming:
        return _streamed_datasets(script_args, training_args.seed, want_eval)
    seed, eval_set, heldout = training_args.seed, None, None
    try:
        if script_args.dataset_name == TINY_DATASET:
            from .tiny import heldout_prompts, make_kto_dataset

            train = make_kto_dataset(script_args.tiny_train_rows, seed=seed)
            eval_set = make_kto_dataset(script_args.tiny_eval_rows, seed=seed, split="heldout") if want_eval else None
            heldout = heldout_prompts()
        elif not script_args.dataset_name:
            _fail(f"no dataset: set dataset_name (a data file or folder, a Hub id, or {TINY_DATASET}).")
        else:
            load = {k: getattr(script_args, k) for k in ("dataset_config", *(f"{c}_column" for c in COLUMNS))}
            load["seed"] = seed
            with _quiet(data_logger):  # a one-class training set stops below with the trainer's message instead
                train = load_unpaired_dataset(script_args.dataset_name, split=script_args.dataset_train_split, **load)
                # The trainer's row checks, on the rows as loaded: a message names the row as in the user's file
                # (holding out an eval split below renumbers the rows).
                check_dataset(train, None, "train")
                if want_eval:
                    split = script_args.dataset_test_split
                    try:
                        eval_set = load_unpaired_dataset(script_args.dataset_name, split=split, **load)
                    except ValueError as err:
                        if not str(err).startswith(f"Split {split!r} not") or not script_args.eval_fraction > 0:
                            raise
                        report = functools.partial(print, f"No {split!r} split:")
                        train, eval_set = train_eval_split(train, script_args.eval_fraction, seed=seed, report=report)
        fractions = (script_args.desirable_fraction, script_args.undesirable_fraction)
        if fractions != (1.0, 1.0):
            train = subsample_class(train, *fractions, seed=seed)
        resolve_loss_aversion(*count_labels(train))  # one class: the trainer's message, before the model loads
    except (FileNotFoundError, ValueError) as err:
        _fail(as_flags(str(err)))
    return train, eval_set, heldout


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """`logger` silenced inside the block."""
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


# Keyword arguments of trl_kto_ext.data that are also options of this command, as messages name them in Python.
_KEYWORDS = re.compile(
    r"(?<![\w-])((?:prompt|completion|label|chosen|rejected)_column|(?:un)?desirable_fraction|eval_fraction"
    r"|max_length)(=\s?)?"
)


def as_flags(message: str) -> str:
    """A message of the Python API in command-line words: `prompt_column=<x>` becomes `--prompt_column <x>`."""
    message = _KEYWORDS.sub(lambda m: f"--{m.group(1)}" + (" " if m.group(2) else ""), message)
    return re.sub(r"(?<![\w-])split=\s?", "--dataset_train_split / --dataset_test_split ", message)


def _streamed_datasets(script_args, seed: int, want_eval: bool):
    """(train, eval or None, tiny_heldout or None) as `IterableDataset`s read lazily (`dataset_streaming`): columns
    mapped and labels normalised row by row; the trainer counts the loss aversion from a bounded look-ahead."""
    from .data import _BUILDERS
    from .labels import decode_labels, normalize_label

    if (script_args.desirable_fraction, script_args.undesirable_fraction) != (1.0, 1.0):
        _fail(
            "desirable_fraction / undesirable_fraction need the whole dataset: not available with dataset_streaming."
        )
    if script_args.dataset_name == TINY_DATASET:
        from .tiny import heldout_prompts, make_kto_dataset

        train = make_kto_dataset(script_args.tiny_train_rows, seed=seed).to_iterable_dataset()
        eval_set = make_kto_dataset(script_args.tiny_eval_rows, seed=seed, split="heldout") if want_eval else None
        return train, eval_set, heldout_prompts()
    if not script_args.dataset_name:
        _fail(f"no dataset: set dataset_name (a data file or folder, a Hub id, or {TINY_DATASET}).")
    import datasets

    name = os.path.expanduser(script_args.dataset_name)
    suffix = os.path.splitext(name)[1].lower()
    if os.path.isfile(name) and suffix not in _BUILDERS:
        _fail(f"unsupported file type {suffix or '(none)'!r} for {name}; convert it to {', '.join(_BUILDERS)}.")
    if _looks_local(script_args.dataset_name) and not os.path.exists(name):
        _fail(f"no such file or folder: {name}.")
    mapping = {getattr(script_args, f"{c}_column"): c for c in COLUMNS}

    def load(split: str):
        if os.path.isfile(name):
            stream = datasets.load_dataset(_BUILDERS[suffix], data_files=name, split=split, streaming=True)
        else:
            stream = datasets.load_dataset(name, name=script_args.dataset_config, split=split, streaming=True)
        renames = {old: new for old, new in mapping.items() if old != new and old in (stream.column_names or [])}
        stream = decode_labels(stream.rename_columns(renames) if renames else stream)  # a ClassLabel by its names
        if "label" in (stream.column_names or []):
            stream = stream.map(lambda row, i: {"label": normalize_label(row["label"], i)}, with_indices=True)
        return stream

    try:
        train = load(script_args.dataset_train_split)
        eval_set = load(script_args.dataset_test_split) if want_eval else None
    except (FileNotFoundError, ValueError) as err:
        _fail(
            as_flags(f"{err} (with dataset_streaming the eval split must exist: eval_fraction cannot split a stream)")
        )
    return train, eval_set, None


def resolve_model_path(name: str | None, build_tiny: bool = True) -> str:
    """The local folder of `tiny` (built and cached on first use), an existing local path, or a Hub id unchanged."""
    if not name:
        _fail(f"no model: set model_name_or_path (a Hub id, a local folder, or {TINY_MODEL}).")
    if name == TINY_MODEL and build_tiny:
        from .tiny import build_tiny_default

        return str(build_tiny_default().model_dir)
    if _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        _fail(f"model path {name} does not exist. Give an existing local folder or a Hub id like 'org/model'.")
    return os.path.expanduser(name) if _looks_local(name) else name


def train(script_args, training_args, model_args, command: list[str] | None = None) -> str:
    """Run KTO training as configured; returns the output_dir. `command` (argv) is recorded in the model card."""
    from .cli_run import run
    from .trainer import KTOExtTrainer

    resolve_model_path(model_args.model_name_or_path, build_tiny=False)  # a wrong path fails before data loading
    train_set, eval_set, heldout = load_datasets(script_args, training_args)
    return run(
        KTOExtTrainer, script_args, training_args, model_args, command, heldout,
        train_dataset=train_set, eval_dataset=eval_set,
    )  # fmt: skip


def plot_main(argv: list[str]) -> int:
    from .plotting import main as plotting_main

    return plotting_main(argv)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line as one line each (no source file and line: users act on the message)."""
    return f"{PROG}: {category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning
    if argv and argv[0] == "plot":
        return plot_main(argv[1:])
    if argv and argv[0] == "online":  # online KTO: its own options (trl_kto_ext/cli_online.py)
        from .cli_online import main as online_main

        return online_main(argv[1:])
    script_args, training_args, model_args, print_config = parse_args(argv)
    if print_config:
        print(format_config(script_args, training_args, model_args), end="")
        return 0
    train(script_args, training_args, model_args, command=[PROG, *argv])
    return 0
