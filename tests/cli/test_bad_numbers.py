"""A bad number on the command line or in the YAML config (NaN, inf, negative, zero, outside its range) stops the
`trl-kto-ext` commands with one line naming the option, the value and what is allowed, before any model or data is
loaded; the same checks hold for KTOExtConfig / OnlineKTOConfig built in Python."""

from __future__ import annotations

import math

import pytest

from trl_kto_ext import KTOExtConfig
from trl_kto_ext.__main__ import main
from trl_kto_ext.online.config import OnlineKTOConfig
from trl_kto_ext.training.config_numbers import NUMBER_RULES

POSITIVE = "must be a positive finite number"
WHOLE = "must be a whole number >= 1"
NON_NEGATIVE = "must be a finite number >= 0"
FRACTION = "must be a number in [0, 1)"

# (flag, value, the message after "trl-kto-ext: error: ")
BAD_NUMBERS = [
    ("learning_rate", "-1", f"`learning_rate` {POSITIVE}, got -1.0. It is the optimizer's step size (TRL's KTO "
     "default: 1e-06)."),
    ("learning_rate", "0", f"`learning_rate` {POSITIVE}, got 0.0."),
    ("learning_rate", "nan", f"`learning_rate` {POSITIVE}, got nan."),
    ("learning_rate", "inf", f"`learning_rate` {POSITIVE}, got inf."),
    ("per_device_train_batch_size", "0", f"`per_device_train_batch_size` {WHOLE}, got 0."),
    ("per_device_train_batch_size", "-4", f"`per_device_train_batch_size` {WHOLE}, got -4."),
    ("per_device_eval_batch_size", "0", f"`per_device_eval_batch_size` {WHOLE}, got 0."),
    ("gradient_accumulation_steps", "0", f"`gradient_accumulation_steps` {WHOLE}, got 0."),
    ("max_steps", "0", "`max_steps` must be a whole number >= 1, or -1, got 0. -1 (the default) trains for "
     "num_train_epochs instead."),
    ("max_steps", "-2", "`max_steps` must be a whole number >= 1, or -1, got -2."),
    ("num_train_epochs", "-1", f"`num_train_epochs` {NON_NEGATIVE}, got -1.0."),
    ("num_train_epochs", "nan", f"`num_train_epochs` {NON_NEGATIVE}, got nan."),
    ("num_train_epochs", "0", "`num_train_epochs` = 0.0 with max_steps unset (-1) trains nothing: set "
     "num_train_epochs above 0 or max_steps to a number of optimizer steps."),
    ("beta", "0", f"`beta` {POSITIVE}, got 0.0. It scales the implied reward inside the sigmoid (the paper's "
     "default: 0.1)."),
    ("beta", "nan", f"`beta` {POSITIVE}, got nan."),
    ("beta", "-0.1", f"`beta` {POSITIVE}, got -0.1."),
    ("desirable_weight", "inf", f"`desirable_weight` {POSITIVE}, got inf."),
    ("undesirable_weight", "0", f"`undesirable_weight` {POSITIVE}, got 0.0."),
    ("undesirable_weight", "nan", f"`undesirable_weight` {POSITIVE}, got nan."),
    ("loss_aversion_target", "nan", "`loss_aversion_target` = nan is outside [1, 4/3]"),
    ("max_length", "0", "`max_length` must be a whole number >= 1 (or unset), got 0. It counts the tokens of prompt "
     "and completion together."),
    ("max_length", "-5", "`max_length` must be a whole number >= 1 (or unset), got -5."),
    ("logging_steps", "0", f"`logging_steps` {POSITIVE}, got 0.0. A value below 1 is a fraction of the training "
     "steps."),
    ("logging_steps", "-3", f"`logging_steps` {POSITIVE}, got -3.0."),
    ("eval_steps", "-1", "`eval_steps` must be a finite number >= 0 (or unset), got -1.0."),
    ("save_steps", "0", f"`save_steps` {POSITIVE}, got 0.0."),
    ("save_total_limit", "0", "`save_total_limit` must be a whole number >= 1 (or unset), got 0. Leave it unset to "
     "keep every checkpoint."),
    ("warmup_steps", "-1", f"`warmup_steps` {NON_NEGATIVE}, got -1.0."),
    ("warmup_steps", "nan", f"`warmup_steps` {NON_NEGATIVE}, got nan."),
    ("weight_decay", "-0.01", f"`weight_decay` {NON_NEGATIVE}, got -0.01."),
    ("max_grad_norm", "-1", "`max_grad_norm` must be a finite number >= 0 (or unset), got -1.0. 0 turns gradient "
     "clipping off."),
    ("max_grad_norm", "inf", "`max_grad_norm` must be a finite number >= 0 (or unset), got inf."),
    ("adam_beta1", "1", f"`adam_beta1` {FRACTION}, got 1.0."),
    ("adam_beta2", "-0.5", f"`adam_beta2` {FRACTION}, got -0.5."),
    ("adam_epsilon", "-0.1", f"`adam_epsilon` {NON_NEGATIVE}, got -0.1."),
    ("adam_epsilon", "-1e-8", f"`adam_epsilon` {NON_NEGATIVE}, got -1e-08."),  # argparse alone takes -1e-8 for a flag
    ("weight_decay", "-inf", f"`weight_decay` {NON_NEGATIVE}, got -inf."),
    ("beta", "-.5", f"`beta` {POSITIVE}, got -0.5."),
    ("seed", "-1", "`seed` must be a whole number in [0, 2**32), got -1."),
    ("dataloader_num_workers", "-1", "`dataloader_num_workers` must be a whole number >= 0, got -1."),
    ("kl_subset_size", "0", "`kl_subset_size` must be a whole number >= 1 (or unset), got 0."),
    ("loss_aversion_stream_rows", "0", f"`loss_aversion_stream_rows` {WHOLE}, got 0."),
    ("max_consecutive_nonfinite_steps", "0", "`max_consecutive_nonfinite_steps` must be a whole number of steps >= 1, got 0."),
    ("precompute_ref_batch_size", "0", "`precompute_ref_batch_size` must be a whole number >= 1 (or unset), got 0."),
]  # fmt: skip

ONLINE_BAD_NUMBERS = [
    ("temperature", "0", f"`temperature` {POSITIVE}, got 0.0."),
    ("temperature", "inf", f"`temperature` {POSITIVE}, got inf."),
    ("top_p", "0", "`top_p` must be a number in (0, 1], got 0.0. 1.0 turns nucleus sampling off."),
    ("top_p", "1.5", "`top_p` must be a number in (0, 1], got 1.5."),
    ("top_k", "-1", "`top_k` must be a whole number >= 0, got -1. 0 turns top-k sampling off."),
    ("num_generations", "0", "`num_generations` must be an integer >= 1 (completions sampled per prompt), got 0."),
    ("max_completion_length", "0", f"`max_completion_length` {WHOLE}, got 0."),
    ("desirable_threshold", "nan", "`desirable_threshold` must be a finite number, got nan."),
    ("loss_aversion_window", "0", f"`loss_aversion_window` {WHOLE}, got 0."),
    ("reward_weights", "nan", "`reward_weights` must be finite numbers, got [nan]."),
    ("learning_rate", "-1", f"`learning_rate` {POSITIVE}, got -1.0."),
    ("learning_rate", "-2E-5", f"`learning_rate` {POSITIVE}, got -2e-05."),
]


def _error(argv) -> str:
    with pytest.raises(SystemExit) as info:  # a SystemExit with a message, never another exception's traceback
        main(argv)
    assert info.value.code not in (0, None)
    return str(info.value.code)


@pytest.mark.parametrize(("flag", "value", "message"), BAD_NUMBERS, ids=[f"{f}={v}" for f, v, _ in BAD_NUMBERS])
def test_bad_number_flag_is_one_line(flag, value, message, tmp_path, capfd):
    argv = ["--model_name_or_path", "tiny", "--dataset_name", "tiny-arithmetic", "--output_dir", str(tmp_path)]
    error = _error([*argv, f"--{flag}", value])
    assert error.startswith(f"trl-kto-ext: error: {message}")
    assert "\n" not in error
    assert "Traceback" not in capfd.readouterr().err
    assert not any(tmp_path.iterdir())  # stopped before anything was written


@pytest.mark.parametrize(
    ("flag", "value", "message"), ONLINE_BAD_NUMBERS, ids=[f"{f}={v}" for f, v, _ in ONLINE_BAD_NUMBERS]
)
def test_bad_number_flag_of_the_online_command_is_one_line(flag, value, message, tmp_path):
    argv = [
        "online",
        "--model_name_or_path",
        "tiny",
        "--dataset_name",
        "tiny-arithmetic",
        "--output_dir",
        str(tmp_path),
    ]
    error = _error([*argv, "--reward_funcs", "trl_kto_ext.models.tiny.exact_answer_reward", f"--{flag}", value])
    assert error.startswith(f"trl-kto-ext: error: {message}")
    assert "\n" not in error


def test_bad_number_in_the_yaml_config_is_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: tiny\ndataset_name: tiny-arithmetic\nlearning_rate: .nan\n")
    assert _error(["--config", str(config), "--output_dir", str(tmp_path / "out")]) == (
        "trl-kto-ext: error: `learning_rate` must be a positive finite number, got nan. It is the optimizer's step "
        "size (TRL's KTO default: 1e-06)."
    )


@pytest.mark.parametrize("name", sorted(NUMBER_RULES))
def test_every_numeric_rule_refuses_nan_in_python(name, tmp_path):
    """Every numeric field of the configs refuses NaN when built in Python, with the field named first."""
    config = OnlineKTOConfig if name not in KTOExtConfig.__dataclass_fields__ else KTOExtConfig
    assert name in config.__dataclass_fields__  # the table names no field that does not exist
    value = [math.nan] if name == "reward_weights" else math.nan
    with pytest.raises(ValueError, match=f"^`{name}` must be "):
        config(output_dir=str(tmp_path), use_cpu=True, **{name: value})


def test_good_values_at_the_edges_are_accepted(tmp_path):
    args = KTOExtConfig(
        output_dir=str(tmp_path), use_cpu=True, max_steps=-1, num_train_epochs=0.5, warmup_steps=0.1, weight_decay=0,
        max_grad_norm=0, logging_steps=0.25, eval_steps=0, adam_beta1=0, seed=0, max_length=None,
    )  # fmt: skip
    assert args.max_grad_norm == 0 and args.logging_steps == 0.25
    online = OnlineKTOConfig(output_dir=str(tmp_path), use_cpu=True, top_p=1.0, top_k=0, desirable_threshold=-3.0)
    assert online.top_p == 1.0


def test_negative_values_in_any_notation_stay_values():
    """`--opt -1e-8` is a value (joined as `--opt=-1e-8`); a flag after a flag, or `=` forms, are left alone."""
    from trl_kto_ext.cli.parsing import join_negative_values

    assert join_negative_values(["--adam_epsilon", "-1e-8", "--beta", "-.5", "--seed", "-1"]) == [
        "--adam_epsilon=-1e-8",
        "--beta=-.5",
        "--seed=-1",
    ]
    assert join_negative_values(["--a", "-NaN", "--b", "-Infinity"]) == ["--a=-NaN", "--b=-Infinity"]
    assert join_negative_values(["--bf16", "--beta=-1e-3", "-x", "--c", "-e5"]) == [
        "--bf16",
        "--beta=-1e-3",
        "-x",
        "--c",
        "-e5",
    ]


def test_a_negative_first_value_of_a_list_option_stays_a_list():
    """`--reward_weights -1 2` (a list option) keeps both values; joining would leave `2` a stray argument."""
    from trl_kto_ext.cli.online import make_parser
    from trl_kto_ext.cli.parsing import _takes_one_value, join_negative_values

    single = _takes_one_value(make_parser())
    assert join_negative_values(["--reward_weights", "-1e-1", "2", "--beta", "-1e-8"], single) == [
        "--reward_weights",
        "-1e-1",
        "2",
        "--beta=-1e-8",
    ]
    assert single("--reward_weights") is False and single("--learning_rate") is True and single("--nope") is False
