"""Two processes on CPU (gloo): z0 is computed over the KL rows of all processes, and a 2-process run on a global
batch gives the z0 and the loss of a 1-process run on the same batch. Launched with torchrun (`accelerate launch
--cpu --num_processes 2` starts a single process on this kind of machine)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from test_window_metrics import row_means

from trl_kto_ext.training.scoped import attribute

pytestmark = pytest.mark.distributed

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def two_process_result(tmp_path_factory):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("two_processes") / "result.json"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", str(Path(worker.__file__)), str(out)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process_result(tmp_path_factory):
    """The same trainer in this (single) process, on the whole global batch and on each half alone."""
    trainer = worker.build_trainer(tmp_path_factory.mktemp("one_process"))
    examples = worker.fixed_examples(trainer)
    full = worker.loss_and_z0(trainer, examples)
    halves = [worker.loss_and_z0(trainer, part) for part in (examples[: worker.SPLIT], examples[worker.SPLIT :])]
    policy, reference = worker.row_logps64(trainer.model, examples), worker.row_logps64(trainer.ref_model, examples)
    rows = [(row["label"], worker.BETA * (p - r), p) for row, p, r in zip(examples, policy, reference)]
    # Weighted: one row at a time (same z0, the global one) gives each row's term; the global weighted mean follows.
    per_row = []
    for i in range(worker.ROWS):
        with attribute(trainer, "_global_reference_point", lambda _, z0=full[1]: torch.tensor(z0)):
            per_row.append(
                worker.weighted_loss(trainer, examples, [1.0 if j == i else 0.0 for j in range(worker.ROWS)])
            )
    return {
        "loss": full[0],
        "z0": full[1],
        "half_z0": [z0 for _, z0 in halves],
        "lambda_D": trainer.desirable_weight,
        "rows": rows,  # (label, beta * r, log pi_theta) of each row of the global batch, float64
        "loss_weighted": worker.weighted_loss(trainer, examples, worker.WEIGHTS),
        "row_terms": per_row,
    }


def test_two_processes_really_ran_with_gloo(two_process_result):
    ranks = two_process_result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert [r["rows"] for r in ranks] == [worker.SPLIT, worker.ROWS - worker.SPLIT]  # uneven: 5 + 3 rows


def test_z0_is_global_and_weighted_by_kl_row_counts(two_process_result, one_process_result):
    ranks = two_process_result["ranks"]
    z0 = one_process_result["z0"]
    assert z0 > 1e-2  # positive, so not clamped: the loss depends on it
    for rank in ranks:
        assert rank["z0"] == pytest.approx(z0, rel=1e-5, abs=1e-6)  # every process uses the global z0
    # A plain mean of the per-process means (5 rows vs 3 rows) would be a different, wrong value.
    naive = sum(one_process_result["half_z0"]) / 2
    assert not math.isclose(naive, z0, rel_tol=1e-3)


def test_two_process_loss_equals_one_process_loss(two_process_result, one_process_result):
    ranks = two_process_result["ranks"]
    # Each process averages over its own rows; the global loss is the row-weighted mean of the two.
    global_loss = sum(r["loss"] * r["rows"] for r in ranks) / sum(r["rows"] for r in ranks)
    assert global_loss == pytest.approx(one_process_result["loss"], rel=1e-5, abs=1e-7)


def test_weighted_loss_over_two_processes_is_the_global_weighted_mean(two_process_result, one_process_result):
    """Each rank divides by half the global sum of weights: the mean of the rank losses (what the DDP-averaged
    gradient differentiates) is sum_i w_i L_i / sum_i w_i over the 8 rows, computed here in float64."""
    ranks = two_process_result["ranks"]
    weights = worker.WEIGHTS
    expected = math.fsum(w * t for w, t in zip(weights, one_process_result["row_terms"])) / math.fsum(weights)
    assert one_process_result["loss_weighted"] == pytest.approx(expected, rel=1e-5)
    assert (ranks[0]["loss_weighted"] + ranks[1]["loss_weighted"]) / 2 == pytest.approx(expected, rel=1e-5)
    # Each rank's own weighted mean, averaged (what dividing by the local sum would give), is a different value.
    split = worker.SPLIT
    local = [weights[:split], weights[split:]]
    terms = [one_process_result["row_terms"][:split], one_process_result["row_terms"][split:]]
    naive = sum(math.fsum(w * t for w, t in zip(ws, ts)) / math.fsum(ws) for ws, ts in zip(local, terms)) / 2
    assert not math.isclose(naive, expected, rel_tol=1e-3)


def test_lambda_counts_the_whole_dataset_on_every_process(two_process_result, one_process_result):
    ranks = two_process_result["ranks"]
    assert ranks[0]["lambda_D"] == ranks[1]["lambda_D"] == pytest.approx(one_process_result["lambda_D"])
    assert all((r["n_desirable"], r["n_undesirable"]) == (9, 21) for r in ranks)
    assert ranks[0]["lambda_D"] == pytest.approx(21 / 9) and ranks[0]["lambda_U"] == 1.0


def test_ddp_training_steps_log_finite_global_metrics(two_process_result):
    logs = two_process_result["train_logs"]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["kl_raw"])
        # Row counts are summed over both processes: 2 x per_device_train_batch_size.
        assert entry["count/desirable"] + entry["count/undesirable"] == 8
        assert entry["kl_rows"] == 4  # KL rows of this process's batch


def test_step_metrics_are_means_over_the_rows_of_both_processes(two_process_result, one_process_result):
    rows = one_process_result["rows"]
    expected = row_means(rows)
    assert expected["count/desirable"] and expected["count/undesirable"]
    for rank in two_process_result["ranks"]:  # 5 rows on rank 0, 3 on rank 1: the totals are reduced, then divided
        for key, value in expected.items():
            assert rank["window"][key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    # The mean of the two processes' own means is another number.
    halves = [row_means(rows[: worker.SPLIT]), row_means(rows[worker.SPLIT :])]
    naive = sum(half["rewards/chosen"] for half in halves if "rewards/chosen" in half) / 2
    assert abs(naive - expected["rewards/chosen"]) > 1e-3


def test_evaluation_over_two_processes_counts_each_row_once(two_process_result):
    metrics, rows = two_process_result["eval"], [tuple(row) for row in two_process_result["eval_rows"]]
    assert len(rows) == worker.EVAL_ROWS
    for key, value in row_means(rows).items():
        assert metrics[f"eval_{key}"] == pytest.approx(value, rel=1e-4, abs=1e-4), key


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
