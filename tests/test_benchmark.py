"""Smoke test of scripts/benchmark.py: `--quick` runs every arm and writes a table and JSON with finite numbers.

No timing is asserted: the machine is shared, and the quick model is far too small for its timings to mean anything.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Six subprocesses that each import torch/transformers/trl: about a minute on 2 idle cores.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "benchmark.py"
ARMS = ["sft", "trl_default", "trl_precompute", "ext_default", "ext_cached", "ext_fastest"]
PRECOMPUTE_ARMS = {"trl_precompute", "ext_cached", "ext_fastest"}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads(out.read_text())


def test_table_lists_every_arm(quick_run):
    stdout, _ = quick_run
    assert "precision: fp32" in stdout and "gradient checkpointing: off" in stdout
    table_rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    for arm in ARMS:
        assert any(line.startswith(f"| {arm} |") for line in table_rows), f"{arm} missing from the table"
    assert "| target | measured (wall clock) | measured (CPU time) | limit | met (wall) | met (CPU) |" in stdout


def test_json_has_every_arm_with_finite_numbers(quick_run):
    _, data = quick_run
    assert data["failures"] == []
    assert data["settings"]["mode"] == "quick"
    rows = {row["arm"]: row for row in data["arms"]}
    assert sorted(rows) == sorted(ARMS)
    for arm, row in rows.items():
        for key in (
            "median_step_s",
            "median_cpu_step_s",
            "median_wall_step_s",
            "x_sft",
            "x_trl_default",
            "x_sft_cpu",
            "x_trl_default_cpu",
            "peak_rss_mb",
            "final_loss",
        ):
            assert _finite(row[key]), f"{arm}.{key} = {row[key]!r}"
        assert row["median_step_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["steps_run"] == data["settings"]["total_steps"]
        assert _finite(row["tokens_per_step"]) and row["tokens_per_step"] > 0
        assert row["passes"] and _finite(row["fwd_equivalents"])
        if arm in PRECOMPUTE_ARMS:
            for key in ("precompute_s", "one_time_steps", "one_time_passes", "one_time_passes_cpu", "one_pass_fwd_s"):
                assert _finite(row[key]) and row[key] > 0, f"{arm}.{key} = {row[key]!r}"
        else:
            assert row["precompute_s"] == 0
    assert rows["sft"]["x_sft"] == pytest.approx(1.0)
    assert rows["trl_default"]["x_trl_default"] == pytest.approx(1.0)
    assert _finite(rows["ext_cached"]["one_pass_sorted_fwd_s"])
    # The table in the JSON is the one printed.
    assert data["table"].splitlines()[0].startswith("precision: fp32")
    for target in data["targets"]:
        assert _finite(target["value"]) and target["met"] in (True, False)
        if target["value_cpu"] is not None:
            assert _finite(target["value_cpu"]) and target["met_cpu"] in (True, False)


def test_theoretical_passes(quick_run):
    _, data = quick_run
    fwd = {row["arm"]: row["fwd_equivalents"] for row in data["arms"]}
    assert fwd["sft"] == 3.0 and fwd["trl_default"] == fwd["ext_default"] == 6.0
    assert fwd["trl_precompute"] == fwd["ext_cached"] == 4.0
    assert 3.0 < fwd["ext_fastest"] < 4.0


def test_chat_shape_is_long_tailed_with_the_stated_medians():
    """The chat-like shape: prompts 8-400 tokens with median ~80, completions 5-200 with median ~50, one epoch."""
    import argparse
    import statistics

    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_setup import build_rows, settings_from_args

    args = argparse.Namespace(
        quick=False, shape="chat", model="llama", steps=None, warmup_steps=None, batch_size=8, kl_subset_size=2,
        bf16=False, gradient_checkpointing=False, seed=0, threads=1,
    )  # fmt: skip
    settings = dict(settings_from_args(args), n_rows=2000)
    rows = build_rows(settings)
    prompts = [len(p.split()) for p in rows["prompt"]]
    completions = [len(c.split()) for c in rows["completion"]]
    assert min(prompts) >= 8 and max(prompts) <= 400 and 70 <= statistics.median(prompts) <= 90
    assert min(completions) >= 5 and max(completions) <= 200 and 43 <= statistics.median(completions) <= 57
    assert max(prompts) > 4 * statistics.median(prompts)  # a long tail
    assert settings["aggregate"] == "mean" and settings["warmup_steps"] == 0
