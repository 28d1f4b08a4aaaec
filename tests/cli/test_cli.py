"""Tests of the `trl-kto-ext` command line: a short end-to-end run, every error message, --print-config, --help."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_kto_ext.__main__ import main
from trl_kto_ext.cli.run import resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
# The trl-kto-ext configs (configs/ also holds inputs of other scripts, e.g. scripts/reproduce.py).
CONFIGS = [
    ROOT / "configs" / f"{name}.yaml" for name in ("tiny-cpu", "qwen2.5-0.5b-lora", "llama3-8b-qlora", "paper-repro")
]
TINY_CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")
# Flags that make a tiny run take seconds: a few steps, small sets, no trackers, no progress bars.
FAST = [
    "--max_steps",
    "3",
    "--eval_steps",
    "2",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
]
FAST += ["--tiny_train_rows", "64", "--tiny_eval_rows", "32"]


def _error(argv) -> str:
    """The message of the SystemExit that `main(argv)` must raise (and never a traceback of another exception)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    return str(info.value.code)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------------------- end to end
def test_tiny_config_end_to_end(tiny_default, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", TINY_CONFIG, "--output_dir", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert (out / "trainer_state.json").is_file()
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()  # final model + tokenizer
    assert "Held-out greedy accuracy before KTO" in printed and "Held-out greedy accuracy after KTO" in printed
    assert "lambda_D" in printed and "lambda_U" in printed
    assert str(out / "training_curves.png") in printed
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/margins" in entry for entry in history) and any("eval_loss" in entry for entry in history)

    # The plot subcommand redraws the curves of a finished run.
    assert main(["plot", str(out), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000


def test_local_model_folder_and_jsonl_file(tiny_default, tmp_path, capsys):
    # The real loading path: a model folder, LoRA, and a data file without a test split (eval_fraction holds out).
    rows = [{"question": f"{a}+{a}=", "answer": str(2 * a + (a % 2)), "label": a % 2 == 0} for a in range(40)]
    data = _write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in rows))
    argv = ["--config", TINY_CONFIG, "--model_name_or_path", str(tiny_default.model_dir), "--dataset_name", data]
    argv += ["--prompt_column", "question", "--completion_column", "answer", "--eval_fraction", "0.25"]
    argv += ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]  # LoRA via get_peft_config
    assert main([*argv, "--output_dir", str(tmp_path / "run"), *FAST]) == 0
    assert "holding out 10 of 40 prompts (10 rows; eval_fraction=0.25)" in capsys.readouterr().out
    assert (tmp_path / "run" / "training_curves.png").is_file()
    assert (tmp_path / "run" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_yaml_key_names_the_closest_valid_key(tmp_path):
    config = _write(tmp_path / "c.yaml", "model_name_or_path: tiny\nlearning_rat: 1.0e-4\n")
    message = _error(["--config", config])
    assert "unknown key `learning_rat`" in message and str(config) in message
    assert "Did you mean `learning_rate`?" in message


@pytest.mark.parametrize("key,meant", [("batch_size", "per_device_train_batch_size"), ("lr", "learning_rate")])
def test_another_tools_option_name_suggests_ours(tmp_path, key, meant):
    config = _write(tmp_path / "c.yaml", f"model_name_or_path: tiny\n{key}: 4\n")
    assert f"Did you mean `{meant}`?" in _error(["--config", config])
    assert f"Did you mean `--{meant}`?" in _error([f"--{key}", "4"])


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    config = _write(tmp_path / "c.yaml", "model_name_or_path: tiny\nbeta: 0.1\nmax_steps: 3\nbeta: 0.5\n")
    assert "`beta` is given twice (lines 2 and 4): keep one" in _error(["--config", config])


def test_a_nested_section_says_options_are_top_level(tmp_path):
    config = _write(tmp_path / "c.yaml", "model_name_or_path: tiny\ntraining:\n  beta: 0.1\n  max_steps: 3\n")
    message = _error(["--config", config])
    assert "unknown key `training`" in message and "every option is a top-level key of the file" in message


@pytest.mark.parametrize(
    "flag,closest", [("--learning-rat", "learning_rate"), ("--bta", "beta"), ("--max_step", "max_steps")]
)
def test_unknown_flag_names_the_closest_valid_option(flag, closest):
    assert f"Did you mean `--{closest}`?" in _error([flag, "1"])


def test_malformed_yaml_gives_file_and_line(tmp_path):
    config = _write(tmp_path / "bad.yaml", "beta: 0.1\nmax_steps: 3\n  oops: [1, 2\n")
    message = _error(["--config", config])
    assert "malformed YAML" in message and f"{config}, line 3" in message


def test_yaml_that_is_not_a_mapping(tmp_path):
    assert "must hold a mapping" in _error(["--config", _write(tmp_path / "list.yaml", "- beta\n- 0.1\n")])


def test_missing_config_file(tmp_path):
    assert "config file" in _error(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    "line, expected",
    [
        ("beta: abc", "`beta: 'abc'`"),
        ("max_steps: 1.5", "max_steps expects int (got float)"),
        ("use_cpu: maybe", "use_cpu expects bool"),
        ("lora_r: [8, 16]", "lora_r expects int (got list)"),
    ],
)
def test_wrong_type_in_yaml_names_field_value_and_type(tmp_path, line, expected):
    message = _error(["--config", _write(tmp_path / "c.yaml", line + "\n")])
    assert "wrong type" in message and expected in message
    if line.startswith("beta"):
        assert "beta expects float (got str)" in message


def test_invalid_choice_in_yaml(tmp_path):
    message = _error(["--config", _write(tmp_path / "c.yaml", "eval_strategy: sometimes\n")])
    assert "not a valid choice" in message and "steps" in message


def test_wrong_type_flag():
    assert "argument --beta: invalid float value: 'abc'" in _error(["--beta", "abc"])


def test_config_check_of_a_dataclass_is_a_plain_error(tmp_path):
    message = _error(["--config", TINY_CONFIG, "--output_dir", str(tmp_path), "--loss_aversion_target", "2"])
    assert "loss_aversion_target" in message and "[1, 4/3]" in message


def test_missing_dataset_file(tmp_path):
    missing = tmp_path / "missing.jsonl"
    message = _error(["--config", TINY_CONFIG, "--output_dir", str(tmp_path), "--dataset_name", str(missing)])
    assert "No such file or folder" in message and str(missing) in message


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no/such/model"])
def test_nonexistent_local_model_path(tmp_path, path):
    message = _error(["--config", TINY_CONFIG, "--output_dir", str(tmp_path), "--model_name_or_path", path])
    assert f"model path {path} does not exist" in message


def test_hub_ids_are_not_taken_for_local_paths():
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct", build_tiny=False) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model_path("gpt2", build_tiny=False) == "gpt2"


def test_plot_without_trainer_state(tmp_path):
    assert "No trainer_state.json" in _error(["plot", str(tmp_path)])


# ------------------------------------------------------------------------------------------ configs and help
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_print_config_of_every_shipped_yaml(config, capsys):
    assert config.read_text().startswith(f"# Launch: trl-kto-ext --config configs/{config.name}")
    assert main(["--config", str(config), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in yaml.safe_load(config.read_text()).items():
        got = printed[key]
        if key == "report_to":
            value = [value] if isinstance(value, str) else value
        if isinstance(value, float) or isinstance(got, float):
            assert float(got) == pytest.approx(float(value)), key
        else:
            assert got == value, key


def test_flags_override_the_yaml(capsys):
    assert main(["--config", TINY_CONFIG, "--beta", "0.3", "--max_steps", "7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["beta"] == 0.3 and printed["max_steps"] == 7 and printed["model_name_or_path"] == "tiny"


def test_print_config_output_is_a_valid_config(tmp_path, capsys):
    main(["--config", TINY_CONFIG, "--print-config"])
    first = capsys.readouterr().out
    main(["--config", _write(tmp_path / "printed.yaml", first), "--print-config"])
    assert capsys.readouterr().out == first


def test_yaml_env_section_sets_environment_variables(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRL_KTO_EXT_TEST_VAR", raising=False)
    config = _write(tmp_path / "c.yaml", "env:\n  TRL_KTO_EXT_TEST_VAR: hello\nbeta: 0.2\n")
    assert main(["--config", config, "--use_cpu", "true", "--print-config"]) == 0
    assert os.environ.pop("TRL_KTO_EXT_TEST_VAR") == "hello"


def test_module_help_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "trl_kto_ext", "--help"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    for text in ("--config", "--print-config", "plot OUTPUT_DIR", "--model_name_or_path", "--loss_aversion"):
        assert text in result.stdout


def test_heldout_accuracy_only_for_the_tiny_vocabulary(tiny_tokenizer, capsys):
    """The tiny task's exact-match accuracy is printed for the tiny model (or one trained from it) only: another model
    answers in its own words, and its 0.000 there would be a wrong number (seen with SmolLM2 on tiny-arithmetic)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from trl_kto_ext.cli.run import _tiny_vocabulary

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"hi": 0, "<unk>": 1}, "<unk>")))
    assert _tiny_vocabulary(tiny_tokenizer)
    assert not _tiny_vocabulary(other)
