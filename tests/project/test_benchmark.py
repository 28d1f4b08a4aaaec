"""scripts/benchmark.py: the report's targets computed from synthetic measurements, and a `--quick` smoke run of
every arm that writes a table and JSON with finite numbers.

No timing is asserted: the machine is shared, and the quick model is far too small for its timings to mean anything.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
SCRIPT = ROOT / "scripts" / "benchmark.py"
ARMS = ["sft", "trl_default", "trl_precompute", "ext_default", "ext_precompute", "ext_cached", "ext_fastest"]
PRECOMPUTE_ARMS = {"trl_precompute", "ext_precompute", "ext_cached", "ext_fastest"}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Six subprocesses that each import torch/transformers/trl: about a minute on 2 idle cores.
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


@pytest.mark.slow
def test_table_lists_every_arm(quick_run):
    stdout, _ = quick_run
    assert "precision: fp32" in stdout and "gradient checkpointing: off" in stdout
    table_rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    for arm in ARMS:
        assert any(line.startswith(f"| {arm} |") for line in table_rows), f"{arm} missing from the table"
    assert "| target | measured (wall clock) | measured (CPU time) | limit | met (wall) | met (CPU) |" in stdout


@pytest.mark.slow
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
    for arm in ("ext_cached", "ext_fastest"):  # a second trainer on the same cache: a hit, no reference forward
        assert rows[arm]["second_run_ref_forwards"] == 0
        assert _finite(rows[arm]["second_run_precompute_s"]) and _finite(rows[arm]["one_pass_own_fwd_s"])
    # The table in the JSON is the one printed.
    assert data["table"].splitlines()[0].startswith("precision: fp32")
    for target in data["targets"]:
        assert _finite(target["value"]) and target["met"] in (True, False)
        if target["value_cpu"] is not None:
            assert _finite(target["value_cpu"]) and target["met_cpu"] in (True, False)


@pytest.mark.slow
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


@pytest.mark.real_model
@pytest.mark.parametrize("shape", ["short", "chat"])
def test_real_model_rows_tokenize_to_the_drawn_lengths(shape):
    """`--model smollm2-135m-instruct`: SmolLM2's own tokenizer, rows of real words that re-tokenize to exactly the
    drawn lengths, and those lengths (and labels) the same as the random-weight `smollm2-135m` preset's."""
    import argparse

    from benchmark_real import REAL_MODEL_LABEL, real_model_path
    from benchmark_setup import build_data, build_rows, settings_from_args

    from trl_kto_ext.models.smollm2 import FetchError

    try:
        real_model_path()
    except (FetchError, ImportError) as err:
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched and converted: {err}")

    def settings(model):
        args = argparse.Namespace(
            quick=False, shape=shape, model=model, steps=None, warmup_steps=None, batch_size=8, kl_subset_size=2,
            bf16=False, gradient_checkpointing=False, seed=0, threads=1,
        )  # fmt: skip
        return settings_from_args(args)

    real = settings("smollm2-135m-instruct")
    assert real["real_model"] and real["vocab_size"] == 49152 and real["model_label"] == REAL_MODEL_LABEL
    tokenizer, rows = build_data(real)
    assert len(tokenizer) == 49152 and len(rows["prompt"]) == real["n_rows"]
    for column in ("prompt", "completion"):
        drawn = [len(text.split()) for text in rows[column]]
        ids = tokenizer(rows[column], add_special_tokens=False)["input_ids"]
        assert [len(i) for i in ids] == drawn, column
    texts = [p + c for p, c in zip(rows["prompt"], rows["completion"])]
    joined = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [len(i) for i in joined] == [len(text.split()) for text in texts]
    synthetic = build_rows(settings("smollm2-135m"))
    assert [len(p.split()) for p in synthetic["prompt"]] == [len(p.split()) for p in rows["prompt"]]
    assert [len(c.split()) for c in synthetic["completion"]] == [len(c.split()) for c in rows["completion"]]
    assert synthetic["label"] == rows["label"]


def test_table_header_names_the_model():
    from benchmark_report import _model_text, _row_tokens_text

    row = dict(n_params=134_515_008, real_tokens_per_row=43.4, drawn_tokens_per_row=43.4)
    real = dict(vocab_size=49152, arch="llama", model_label="SmolLM2-135M-Instruct, real weights")
    assert _model_text(row, real) == "SmolLM2-135M-Instruct, real weights (Llama 134.5M params, vocab 49152)"
    assert _model_text(dict(row, n_params=22.7e6), dict(vocab_size=32000)) == "Llama 22.7M params, vocab 32000"
    assert _row_tokens_text(row) == " (mean 43.4 tokens/row re-tokenized, 43.4 drawn)"
    assert _row_tokens_text({}) == ""


# ---------------------------------------------------------------------------------------- report, synthetic input

# (arm, s/step, CPU s/step, peak RSS MB, precompute s, precompute CPU s); one repeat each, no warm-up step
SYNTHETIC = [
    ("sft", 1.0, 2.0, 1000, 0.0, 0.0),
    ("trl_default", 2.0, 4.0, 2000, 0.0, 0.0),
    ("trl_precompute", 1.5, 3.0, 1800, 6.0, 12.0),
    ("ext_default", 1.1, 2.6, 1400, 0.0, 0.0),
    ("ext_cached", 0.8, 1.7, 1400, 3.0, 5.0),
]


def synthetic_runs(aggregate):
    runs = {}
    for arm, step, cpu, rss, pre, pre_cpu in SYNTHETIC:
        steps = [step - 0.5, step, step + 0.5] if aggregate == "mean" else [step - 0.1, step, step + 0.9]
        cpu_steps = [cpu - 1.0, cpu, cpu + 1.0] if aggregate == "mean" else [cpu - 0.2, cpu, cpu + 1.8]
        result = dict(
            arm=arm, step_s=steps, cpu_step_s=cpu_steps, wall_step_s=steps, median_step_s=step, precompute_s=pre,
            precompute_cpu_s=pre_cpu, construct_s=1.0, peak_rss_mb=rss, cuda_peak_mb=None, _warmup_steps=0,
            _aggregate=aggregate,
        )  # fmt: skip
        if pre:
            result.update(one_pass_fwd_s=4.0, one_pass_fwd_cpu_s=8.0)
        if arm == "ext_cached":
            result.update(
                one_pass_own_fwd_s=2.0, one_pass_own_fwd_cpu_s=4.0, second_run_precompute_s=0.2,
                second_run_precompute_cpu_s=0.4, second_run_ref_forwards=0,
            )  # fmt: skip
        runs[arm] = [result]
    return runs


@pytest.mark.parametrize("aggregate", ["mean", "median"])
def test_targets_are_the_issue_targets_computed_from_the_measurements(aggregate):
    """Issue 12's targets, each ratio recomputed here from the synthetic numbers (the mean and the median of the
    synthetic steps are both the middle value, so the ratios are the same for both statistics)."""
    from benchmark_report import check_targets, summarise
    from benchmark_setup import arms_for

    arms = [arm for arm in arms_for(2, 8) if arm.name != "ext_fastest"]
    rows = summarise(synthetic_runs(aggregate), arms)
    by = {row["arm"]: row for row in rows}
    assert by["ext_default"]["step_stat"] == aggregate
    assert by["ext_default"]["median_step_s"] == pytest.approx(1.1)
    assert by["ext_cached"]["one_time_passes"] == pytest.approx(3.0 / 4.0)
    assert by["ext_cached"]["one_time_own_passes_cpu"] == pytest.approx(5.0 / 4.0)
    assert by["ext_cached"]["second_run_passes"] == pytest.approx(0.2 / 4.0)
    targets = {t["target"]: t for t in check_targets(rows)}
    expected = {
        "ext_default s/step <= 0.6x trl_default": (1.1 / 2.0, 2.6 / 4.0, 0.6, True, False),
        "ext_default s/step <= 1.2x sft": (1.1 / 1.0, 2.6 / 2.0, 1.2, True, False),
        "ext_cached s/step <= 0.6x trl_precompute": (0.8 / 1.5, 1.7 / 3.0, 0.6, True, True),
        "ext_default peak memory (RSS) <= 0.75x trl_default": (1400 / 2000, None, 0.75, True, None),
        "ext_cached peak memory (RSS) <= 0.75x trl_precompute": (1400 / 1800, None, 0.75, False, None),
        "ext_cached reference cache, first run, in passes (see unit) <= 1.0": (3.0 / 4.0, 5.0 / 8.0, 1.0, True, True),
        "ext_cached reference forwards on a second run (same model, data, cache dir) <= 0": (0, None, 0, True, None),
    }
    assert set(targets) == set(expected)
    for name, (value, value_cpu, limit, met, met_cpu) in expected.items():
        t = targets[name]
        assert t["value"] == pytest.approx(value) and t["limit"] == limit, name
        assert (t["value_cpu"] is None) == (value_cpu is None), name
        if value_cpu is not None:
            assert t["value_cpu"] == pytest.approx(value_cpu), name
        assert (t["met"], t["met_cpu"]) == (met, met_cpu), name


def test_a_second_run_that_ran_the_reference_misses_the_target():
    from benchmark_report import check_targets, summarise
    from benchmark_setup import arms_for

    runs = synthetic_runs("mean")
    runs["ext_cached"][0]["second_run_ref_forwards"] = 12
    rows = summarise(runs, arms_for(2, 8))
    (target,) = [t for t in check_targets(rows) if "second run" in t["target"]]
    assert target["value"] == 12 and target["met"] is False


@pytest.mark.parametrize("aggregate,stat", [("mean", "mean"), (None, "median")])
def test_table_headers_name_the_statistic_used(aggregate, stat):
    from benchmark_report import PASS_UNIT, check_targets, format_table, format_targets, summarise
    from benchmark_setup import arms_for

    runs = synthetic_runs("mean" if aggregate else "median")
    rows = summarise(runs, arms_for(2, 8))
    settings = dict(
        bf16=False, gradient_checkpointing=False, vocab_size=100, batch_size=8, prompt_len=(1, 2),
        completion_len=(1, 2), warmup_steps=0, steps=3,
    )  # fmt: skip
    if aggregate:
        settings["aggregate"] = aggregate
    for row in rows:
        row.update(device="cpu", torch_threads=1, n_params=1e6, repeats=1, tokens_per_step=1.0,
                   padded_tokens_per_step=1.0, passes="", fwd_equivalents=1.0)  # fmt: skip
    table = format_table(rows, settings, {"loadavg_start": "0"})
    header = next(line for line in table.splitlines() if line.startswith("| arm |"))
    other = "median" if stat == "mean" else "mean"
    assert f"| {stat} s/step |" in header and f"CPU {stat} s/step" in header and other not in header
    assert ("mean over one whole epoch" if stat == "mean" else "median of the measured steps") in table
    cached = next(line for line in table.splitlines() if line.startswith("| ext_cached |"))
    assert "0.20 (0.05; 0)" in cached  # second run: seconds (passes; reference forwards)
    assert PASS_UNIT in format_targets(check_targets(rows))
