"""Tests of the command line's first minutes: a grouped, short --help; plot without torch; a start with no warnings."""

import json
import os
import subprocess
import sys
from pathlib import Path

from trl_kto_ext.cli.offline import make_parser

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
# Lines a start with nothing 4-bit in use must not print: bitsandbytes' CPU backend import, transformers'
# deprecated-alias warning for TRL's gradient_checkpointing default, torch's pin_memory warning without a GPU.
NOISE = ("gemm_4bit", "kernels-community", "`gradient_checkpointing` is deprecated", "pin_memory")


def _run(args, **kwargs):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _help(flag="--help") -> str:
    return _run(["-m", "trl_kto_ext", flag]).stdout


def test_help_lists_kto_options_first_and_is_short():
    text = _help()
    lines = text.splitlines()
    head = "\n".join(lines[:60])
    for needed in ("--beta", "--loss_aversion", "--kl_pairing", "--config", "--print-config", "plot OUTPUT_DIR"):
        assert needed in head, needed
    assert len(lines) < 150, len(lines)
    titles = [line.rstrip(":") for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert titles[-5:] == ["KTO", "data", "model/LoRA", "common training options", titles[-1]] and titles[
        -1
    ].startswith("all other options")
    assert "--help-all" in text
    assert "If `datasets` is provided" not in text  # TRL's text for an argument this command does not have
    name_help = text[text.index("--model_name_or_path") :].split("--model_revision")[0]
    assert "tiny" in name_help


def test_help_all_lists_every_option():
    text = _help("--help-all")
    parser = make_parser()
    options = [a.option_strings[0] for a in parser._actions if a.option_strings]
    assert len(options) > 150
    missing = [o for o in options if f"  {o} " not in text and not text.count(f"  {o}\n")]
    assert not missing
    assert len(text.splitlines()) > 2 * len(_help().splitlines())


def test_plot_imports_no_torch(tmp_path):
    history = [{"step": s, "loss": 0.5, "rewards/margins": 0.1 * s, "lambda_D": 1.0, "lambda_U": 1.0} for s in (1, 2)]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    code = (
        "import sys; from trl_kto_ext.__main__ import main; main(['plot', sys.argv[1]]); "
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    result = _run(["-c", code, str(tmp_path)])
    assert result.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_help_is_quiet_and_imports_no_bitsandbytes():
    code = (
        "import sys; from trl_kto_ext.cli.offline import make_parser; make_parser(); "
        "print(sorted(m for m in ('bitsandbytes', 'datasets') if m in sys.modules))"
    )
    result = _run(["-c", code])
    assert result.stdout.strip() == "[]"  # neither is needed to list the options (each costs ~0.5-1 s)
    help_run = _run(["-m", "trl_kto_ext", "--help"])
    assert not [n for n in NOISE if n in help_run.stderr], help_run.stderr


def test_bitsandbytes_still_importable_after_the_cli_started():
    # The CLI hides bitsandbytes only while it imports the config classes; 4-bit LoRA later in the process must work.
    code = (
        "import trl_kto_ext.cli.offline, sys; from peft.import_utils import is_bnb_4bit_available; "
        "from peft.tuners.lora import Linear4bit; import bitsandbytes; print(is_bnb_4bit_available(), Linear4bit.__name__)"
    )
    assert _run(["-c", code]).stdout.split()[-2:] == ["True", "Linear4bit"]


def test_three_step_run_is_quiet_and_writes_a_model_card(tiny_default, tmp_path):
    out = tmp_path / "run"
    argv = ["--config", "configs/tiny-cpu.yaml", "--output_dir", str(out), "--max_steps", "3", "--report_to", "none"]
    argv += ["--eval_strategy", "no", "--tiny_train_rows", "64", "--disable_tqdm", "true"]
    code = (
        "import sys; from trl_kto_ext.__main__ import main; main(sys.argv[1:]); print('bitsandbytes' in sys.modules)"
    )
    result = _run(["-c", code, *argv], timeout=600)
    assert result.stdout.splitlines()[-1] == "False"
    assert not [n for n in NOISE if n in result.stderr], result.stderr
    card = (out / "README.md").read_text()
    assert "--max_steps 3" in card and "tiny-arithmetic" in card and tiny_default.model_dir in card


def test_config_defaults_cause_no_deprecation_warning(tmp_path):
    import warnings

    from trl_kto_ext import KTOExtConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True)
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True  # TRL's default, kept
    assert args.dataloader_pin_memory is False  # no accelerator to pin memory for
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_name = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=False)
    assert old_name.activation_checkpointing is False  # the user's value under the deprecated name still counts
    assert any("`gradient_checkpointing` is deprecated" in str(w.message) for w in caught)
