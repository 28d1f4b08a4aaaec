"""Every file of the package, its scripts, configs and tests is tracked by git: none is hidden by .gitignore (a rule
like `data/` once hid trl_kto_ext/data/hub.py, so a fresh clone could not import the CLI)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_no_source_file_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    run = subprocess.run(
        ["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--", "trl_kto_ext", "scripts", "configs",
         "tests", "docs", "notebooks"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    hidden = [p for p in run.stdout.splitlines() if "__pycache__" not in p and not p.endswith(".pyc")]
    assert not hidden, f"ignored by .gitignore, so missing from every clone: {hidden}"
