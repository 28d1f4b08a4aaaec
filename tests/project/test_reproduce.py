"""scripts/reproduce.py --quick: every arm trains and the table, JSON and plots are written (no accuracy checks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reproduce_quick_trains_every_arm_and_writes_outputs(tiny_default, tmp_path):
    # tiny_default builds (or loads) the cached base model first, so the subprocess only trains.
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--config", "configs/reproduce.yaml", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.md", "results.json", "accuracy.png", "kto_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    report = json.loads((out / "results.json").read_text())
    expected = yaml.safe_load((ROOT / "configs" / "reproduce.yaml").read_text())["arms"]
    assert {"base", "sft", "dpo", "kto", "kto_d10", "kto_nosft", "kto_fast"} <= set(expected)
    assert list(report["arms"]) == expected
    for arm in expected[1:]:
        assert report["arms"][arm]["steps"] > 0 and report["arms"][arm]["best_lr"] is not None, arm
        assert report["arms"][arm]["sweep"], arm
    for arm in report["arms"].values():
        for value in arm["per_seed"].values():
            assert 0.0 <= value <= 1.0
    # The 90%-dropped arm raises lambda_D above lambda_U (auto loss aversion, Eq. 8).
    lambda_d, lambda_u = report["arms"]["kto_d10"]["lambdas"]
    assert lambda_d > lambda_u
    assert any("rewards/chosen" in entry for entry in report["kto_curves"]["kto"]["log_history"])

    table = (out / "results.md").read_text()
    for arm in report["arms"].values():
        assert arm["label"] in table
