"""`trl-kto-ext`: offline KTO with KTOExtTrainer from a YAML config and/or flags, shaped like TRL's `trl kto` script."""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)
import sys
from dataclasses import dataclass, field, fields

from trl_kto_ext.cli.help import help_groups
from trl_kto_ext.cli.parsing import (
    PROG,
    _fail,
    as_flags,
    format_config,
    missing_file_hint,
    new_parser,
    one_line_warnings,
    parse_args,
)
from trl_kto_ext.cli.run import resolve_model_path
from trl_kto_ext.data.pipeline import COLUMNS, PreparedData
from trl_kto_ext.models import TINY_DATASET, TINY_MODEL
from trl_kto_ext.training.peft_utils import without_bitsandbytes

with without_bitsandbytes():  # peft (through TrainingArguments) would import it; train() does when 4/8-bit is set
    from trl import ModelConfig, ScriptArguments, TrlParser

    from trl_kto_ext.config import KTOExtConfig

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
    """TRL's ScriptArguments plus the column mapping, class subsampling and held-out split of `trl_kto_ext.data.loading`."""

    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    completion_column: str = field(default="completion", metadata={"help": "Column holding the completion."})
    label_column: str = field(default="label", metadata={"help": "Column holding the desirable/undesirable label."})
    chosen_column: str = field(default="chosen", metadata={"help": "Chosen column of paired data (unpaired on load)."})
    rejected_column: str = field(default="rejected", metadata={"help": "Rejected column of paired data."})
    weight_column: str = field(
        default="weight",
        metadata={"help": "Column holding a per-row (or per-pair) loss weight >= 0; rows weigh 1.0 without it."},
    )
    score_column: str = field(
        default="score",
        metadata={"help": "Column holding a score to label by (label_mode, desirable_threshold) when no label."},
    )
    desirable_fraction: float = field(default=1.0, metadata={"help": "Share of desirable training rows to keep."})
    undesirable_fraction: float = field(default=1.0, metadata={"help": "Share of undesirable training rows to keep."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share held out for eval if no test split."})
    tiny_train_rows: int = field(default=2048, metadata={"help": f"Training rows of the {TINY_DATASET} dataset."})
    tiny_eval_rows: int = field(default=256, metadata={"help": f"Eval rows of {TINY_DATASET} (held-out prompts)."})


def make_parser(prog: str | None = PROG) -> TrlParser:
    """TrlParser over (KTOScriptArguments, KTOExtConfig, ModelConfig) whose --help lists the KTO options first."""
    data = " ".join(f.name for f in fields(KTOScriptArguments) if f.name != "ignore_bias_buffers")
    return new_parser(
        (KTOScriptArguments, KTOExtConfig, ModelConfig), prog, USAGE, DESCRIPTION, help_groups(data, ModelConfig)
    )


def load_datasets(script_args, training_args) -> PreparedData:
    """(train, eval or None, tiny held-out or None) of `dataset_name` through the data pipeline
    ([`trl_kto_ext.data.pipeline.prepare_datasets`]); SystemExit with its message in flag words. A training set of
    one class is not refused: the trainer trains on it and prints what lambda_D / lambda_U mean then."""
    from trl_kto_ext.data.pipeline import prepare_datasets

    want_eval = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    try:
        data = prepare_datasets(
            script_args.dataset_name,
            split=script_args.dataset_train_split,
            test_split=script_args.dataset_test_split,
            dataset_config=script_args.dataset_config,
            columns={c: getattr(script_args, f"{c}_column") for c in COLUMNS},
            desirable_fraction=script_args.desirable_fraction,
            undesirable_fraction=script_args.undesirable_fraction,
            eval_fraction=script_args.eval_fraction,
            want_eval=want_eval,
            streaming=script_args.dataset_streaming,
            seed=training_args.seed,
            tiny_rows=(script_args.tiny_train_rows, script_args.tiny_eval_rows),
            scores=training_args,  # label_mode, desirable_threshold, score_weighting for a `score` column
        )
    except (FileNotFoundError, ValueError) as err:
        _fail(as_flags(str(err)) + missing_file_hint(err))
    return data


def train(script_args, training_args, model_args, command: list[str] | None = None) -> str:
    """Run KTO training as configured; returns the output_dir. `command` (argv) is recorded in the model card."""
    from trl_kto_ext.cli.run import run
    from trl_kto_ext.trainer import KTOExtTrainer

    resolve_model_path(model_args.model_name_or_path, build_tiny=False)  # a wrong path fails before data loading
    train_set, eval_set, heldout = load_datasets(script_args, training_args)
    return run(
        KTOExtTrainer, script_args, training_args, model_args, command, heldout,
        train_dataset=train_set, eval_dataset=eval_set,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`trl-kto-ext [--config FILE] [--OPTION VALUE ...]`: offline KTO as configured; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    one_line_warnings()
    script_args, training_args, model_args, print_config = parse_args(argv, make_parser())
    if print_config:
        print(format_config(script_args, training_args, model_args), end="")
        return 0
    train(script_args, training_args, model_args, command=[PROG, *argv])
    return 0
