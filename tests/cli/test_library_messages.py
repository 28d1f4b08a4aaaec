"""On the command line, each warning line names the library it comes from (`transformers: FutureWarning: ...`, ours
`trl-kto-ext: ...`); bitsandbytes' 'silently incorrect behavior' warning is explained once; the messages our own set-up
causes (peft reading a deprecated transformers property, bitsandbytes asking for `kernels`) are not printed."""

import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers

from trl_kto_ext.errors import NOTICE
from trl_kto_ext.training import library_messages
from trl_kto_ext.training.library_messages import format_warning, warning_source

ROOT = Path(__file__).resolve().parents[2]
GEMV = (
    "bitsandbytes::gemv_4bit: an autograd kernel was not registered to the Autograd key(s) but we are trying to "
    "backprop through it. This may lead to silently incorrect behavior."
)


def _file_of(module, name):
    return os.path.join(os.path.dirname(module.__file__), name)


def test_each_warning_line_names_its_library(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        _file_of(transformers, "modeling_utils.py"): "transformers",
        _file_of(peft, "peft_model.py"): "peft",
        _file_of(torch, "autograd/graph.py"): "torch",
        str(ROOT / "trl_kto_ext" / "config.py"): "trl-kto-ext",
        str(tmp_path / "myreward.py"): "myreward",
    }
    for filename, source in cases.items():
        assert warning_source(filename) == source
    line = format_warning("`x` is deprecated", FutureWarning, _file_of(transformers, "training_args.py"), 1)
    assert line == "transformers: FutureWarning: `x` is deprecated\n"
    ours = format_warning("loss_aversion is 'manual'", UserWarning, str(ROOT / "trl_kto_ext" / "config.py"), 1)
    assert ours == "trl-kto-ext: UserWarning: loss_aversion is 'manual'\n"


def test_the_cli_prints_warnings_with_their_library(tmp_path):
    code = (
        "import warnings, transformers, os\n"
        "from trl_kto_ext.cli.parsing import one_line_warnings\n"
        "one_line_warnings()\n"
        "path = os.path.join(os.path.dirname(transformers.__file__), 'trainer.py')\n"
        "warnings.warn_explicit('`y` is deprecated', FutureWarning, path, 7)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="default")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.stderr.splitlines()[-1] == "transformers: FutureWarning: `y` is deprecated"


def test_bitsandbytes_backprop_warning_is_explained_once(monkeypatch):
    monkeypatch.setattr(library_messages, "_noted", set())
    source = _file_of(torch, "_ops.py")
    first = format_warning(GEMV, UserWarning, source, 1)
    second = format_warning(GEMV, UserWarning, source, 1)
    assert first.splitlines()[0] == f"torch: UserWarning: {GEMV}"
    assert first.splitlines()[1].startswith("trl-kto-ext: the warning above is not safe to ignore: a bitsandbytes ")
    assert len(first.splitlines()) == 2 and second == f"torch: UserWarning: {GEMV}\n"


def test_a_qlora_run_prints_no_library_message_we_cause(tiny_default, tmp_path):
    """A QLoRA CLI run (with the held-out evaluation before training, in eval mode): no bitsandbytes backprop warning,
    no request to install `kernels`, no deprecation warning from peft's model wrapping, nothing shown as ours."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="default")
    argv = ["--model_name_or_path", "tiny", "--dataset_name", "tiny-arithmetic", "--output_dir", str(tmp_path),
            "--report_to", "none", "--max_steps", "2", "--use_peft", "--load_in_4bit", "--disable_tqdm", "true",
            "--learning_rate", "1e-3", "--activation_checkpointing", "true"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "trl_kto_ext", *argv], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = run.stdout + run.stderr
    for text in ("silently incorrect", "kernels-community", "is_gradient_checkpointing", "trl-kto-ext: FutureWarning"):
        assert text not in printed
    import bitsandbytes.functional

    if bitsandbytes.functional.has_avx512bf16():  # the import-time notice does exist on this CPU, outside the CLI
        plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env, capture_output=True, text=True)
        assert "kernels-community" in plain.stdout + plain.stderr


@pytest.mark.parametrize("name", ["KTOExtTrainer", "OnlineKTOTrainer", "KTOExtConfig"])
def test_the_python_api_import_prints_no_request_to_install_kernels(name):
    """`from trl_kto_ext import KTOExtTrainer` (which imports peft, hence bitsandbytes) is as quiet as the CLI."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    code = f"from trl_kto_ext import {name}"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "kernels-community" not in run.stdout + run.stderr


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_line_lets_openmp_threads_sleep_unless_told_otherwise(given, expected):
    """`trl-kto-ext` sets OMP_WAIT_POLICY=PASSIVE before torch loads (spinning threads on shared cores made steps 8x
    slower); a policy the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(ROOT)}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import sys, os, trl_kto_ext.__main__; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [expected, "False"]  # set before torch was imported


def test_a_notice_is_printed_without_the_warning_label(capsys):
    """A status line logged with `extra=NOTICE` (a reference-cache hit) shows as `trl-kto-ext: ...`, a warning as
    `trl-kto-ext: warning: ...`."""
    import logging

    library_messages.show_package_warnings()
    logger = logging.getLogger("trl_kto_ext.test_notice")
    logger.warning("Reference log-probs for the train set: cache hit", extra=NOTICE)
    logger.warning("something to act on")
    lines = capsys.readouterr().err.splitlines()
    assert "trl-kto-ext: Reference log-probs for the train set: cache hit" in lines
    assert "trl-kto-ext: warning: something to act on" in lines
