"""scripts/sft_to_kto.py (and its SFT "before" script) run end to end on the tiny default; docs/sft_diff.md is current."""

import difflib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "scripts" / "sft_baseline.py"
KTO_SCRIPT = ROOT / "scripts" / "sft_to_kto.py"
DIFF_DOC = ROOT / "docs" / "sft_diff.md"
SMALL_RUN = ["--model", "tiny", "--max-steps", "3", "--batch-size", "4", "--n-rows", "32", "--logging-steps", "1"]


def _run(script: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(script), *SMALL_RUN, "--output-dir", str(output_dir), *extra]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _log_history(output_dir: Path) -> list[dict]:
    state_file = output_dir / "trainer_state.json"
    assert state_file.is_file(), f"no trainer_state.json in {output_dir}: {sorted(os.listdir(output_dir))}"
    return json.loads(state_file.read_text())["log_history"]


def _finite_values(history: list[dict], key: str) -> list[float]:
    values = [entry[key] for entry in history if key in entry]
    assert values, f"{key!r} was never logged: {history}"
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), f"{key}: {values}"
    return values


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_sft_to_kto_script(tmp_path, tiny_default, use_peft):
    output_dir = tmp_path / "kto"
    result = _run(KTO_SCRIPT, output_dir, *(["--use-peft"] if use_peft else []))
    history = _log_history(output_dir)
    _finite_values(history, "loss")
    lambda_d = _finite_values(history, "lambda_D")
    assert all(v > 0 for v in lambda_d)
    _finite_values(history, "lambda_U")
    _finite_values(history, "kl")
    assert "lambda_D=" in result.stdout  # the loss-aversion printout at train start
    saved = {p.name for p in output_dir.iterdir()}
    assert ("adapter_config.json" in saved) == use_peft, saved


def test_sft_baseline_script(tmp_path, tiny_default):
    """The "before" script of the diff runs too (so the diff compares two working scripts)."""
    output_dir = tmp_path / "sft"
    _run(BASELINE, output_dir)
    _finite_values(_log_history(output_dir), "loss")


def _current_diff() -> str:
    lines = difflib.unified_diff(
        BASELINE.read_text().splitlines(keepends=True),
        KTO_SCRIPT.read_text().splitlines(keepends=True),
        fromfile="scripts/sft_baseline.py",
        tofile="scripts/sft_to_kto.py",
    )
    return "".join(lines)


def test_sft_diff_is_short_and_documented():
    diff = _current_diff()
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 0 < len(changed) <= 20, f"the SFT -> KTO diff grew to {len(changed)} changed lines:\n{diff}"
    assert "+from trl_kto_ext import KTOExtConfig, KTOExtTrainer" in diff
    assert "-from trl import SFTConfig, SFTTrainer" in diff
    assert diff in DIFF_DOC.read_text(), (
        "docs/sft_diff.md is out of date: paste the output of "
        "`diff -u scripts/sft_baseline.py scripts/sft_to_kto.py` (without the timestamps) into it"
    )
