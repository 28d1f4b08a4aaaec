"""Tests of trl_kto_ext.plotting: curves from a synthetic trainer_state.json, and the missing-file error."""

import json

import pytest

from trl_kto_ext.plotting import find_state_file, plot_training

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_state(folder, history):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": history}))


def _history(with_eval=True):
    history = []
    for step in range(1, 21):
        history.append(
            {
                "step": step,
                "loss": 0.5 - 0.01 * step,
                "rewards/chosen": 0.02 * step,
                "rewards/rejected": -0.03 * step,
                "rewards/margins": 0.05 * step,
                "kl": max(0.0, 0.01 * step - 0.05),
                "kl_raw": 0.01 * step - 0.05,
                "lambda_D": 1.0,
                "lambda_U": 1.0,
            }
        )
        if with_eval and step % 5 == 0:
            history.append({"step": step, "eval_loss": 0.5 - 0.01 * step, "eval_rewards/margins": 0.04 * step})
    history.append({"step": 20, "train_loss": 0.4, "train_runtime": 1.0})
    return history


def test_plot_from_output_dir(tmp_path):
    _write_state(tmp_path, _history())
    path = plot_training(tmp_path)
    assert path == str(tmp_path / "training_curves.png")
    data = (tmp_path / "training_curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_plot_from_state_file_with_custom_out(tmp_path):
    _write_state(tmp_path / "run", _history(with_eval=False))
    out = tmp_path / "plots" / "curves.png"
    assert plot_training(tmp_path / "run" / "trainer_state.json", out) == str(out)
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_missing_series_are_skipped(tmp_path):
    # Only a loss was logged (e.g. a run without KL): still a PNG, no error.
    _write_state(tmp_path, [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}])
    assert plot_training(tmp_path).endswith("training_curves.png")
    _write_state(tmp_path / "empty", [])
    assert (tmp_path / "empty" / "training_curves.png").name in plot_training(tmp_path / "empty")


def test_latest_checkpoint_is_used(tmp_path):
    _write_state(tmp_path / "checkpoint-5", [{"step": 5, "loss": 0.7}])
    _write_state(tmp_path / "checkpoint-10", _history())
    assert find_state_file(tmp_path) == tmp_path / "checkpoint-10" / "trainer_state.json"
    assert plot_training(tmp_path) == str(tmp_path / "training_curves.png")


def test_missing_state_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No trainer_state\.json in .*checkpoint-\*"):
        plot_training(tmp_path)
    with pytest.raises(FileNotFoundError, match="No such file or folder"):
        plot_training(tmp_path / "nope")


def test_malformed_state_file(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        plot_training(tmp_path)
