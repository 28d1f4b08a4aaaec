"""Tests of trl_kto_ext.report.plotting: curves from a synthetic trainer_state.json, and the missing-file error."""

import json

import pytest

from trl_kto_ext.report.plotting import find_state_file, plot_training

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


def _axes_by_title(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_short_run_figure_is_readable(tmp_path):
    """A 5-step run logs once, in the final summary: whole-step ticks, a loss panel, both lambda curves visible."""
    import matplotlib

    matplotlib.use("Agg")
    from trl_kto_ext.report.plotting import make_figure

    summary = {"step": 5, "train_loss": 0.4993, "rewards/chosen": 0.003, "rewards/rejected": -0.001}
    summary.update({"rewards/margins": 0.004, "kl": 0.0028, "kl_raw": -0.0038, "lambda_D": 1.0, "lambda_U": 1.0})
    fig = make_figure([summary])
    axes = _axes_by_title(fig)
    assert set(axes) == {"Rewards", "Reward margin", "Reference point z0", "Loss aversion", "Loss"}
    for ax in axes.values():
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 5
    (loss_line,) = axes["Loss"].get_lines()
    assert list(loss_line.get_ydata()) == [0.4993] and loss_line.get_marker() == "o"
    assert "train_loss" in loss_line.get_label()
    lam_d, lam_u = axes["Loss aversion"].get_lines()
    assert (lam_d.get_label(), lam_u.get_label()) == ("lambda_D", "lambda_U")
    assert list(lam_d.get_ydata()) == list(lam_u.get_ydata()) == [1.0]  # equal values, yet told apart:
    assert lam_d.get_marker() != lam_u.get_marker() and lam_d.get_linestyle() != lam_u.get_linestyle()
    assert lam_d.get_markersize() > lam_u.get_markersize() and lam_d.get_markerfacecolor() == "none"
    assert "mean over a logging window" in fig._suptitle.get_text()


def test_long_run_has_no_markers_and_eval_is_dashed():
    import matplotlib

    matplotlib.use("Agg")
    from trl_kto_ext.report.plotting import make_figure

    history = [{"step": s, "loss": 1.0 / s, "kl": 0.0, "kl_raw": -0.01} for s in range(1, 151)]
    history += [{"step": s, "eval_loss": 0.5} for s in (50, 100, 150)]
    axes = _axes_by_title(make_figure(history))
    train, evaluation = axes["Loss"].get_lines()
    assert train.get_marker() in (None, "None", "") and len(train.get_xdata()) == 150
    assert evaluation.get_linestyle() == "--" and evaluation.get_label() == "eval loss"
    assert "Loss aversion" not in axes  # not logged: no empty panel


def test_empty_run_says_so_and_a_checkpoint_source_is_named(tmp_path, capsys):
    """A run that logged nothing (logging_steps > steps) gets a note on stderr, not a silent empty figure; a figure
    drawn from a checkpoint names the run and the checkpoint."""
    from matplotlib.figure import Figure

    from trl_kto_ext.report import plotting

    _write_state(tmp_path / "run" / "checkpoint-5", [])
    assert plotting.main([str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "run" / "training_curves.png")
    assert "no metrics were logged in this run yet, so the figure is empty" in err
    titles = []
    original = Figure.suptitle
    Figure.suptitle = lambda self, text, **kw: titles.append(text) or original(self, text, **kw)
    try:
        plot_training(tmp_path / "run")
    finally:
        Figure.suptitle = original
    assert titles[0].startswith("KTO training curves: run (from checkpoint-5)\n")


def test_single_eval_point_is_told_apart_from_training_points_and_online_metrics_are_drawn():
    from trl_kto_ext.report.plotting import make_figure

    history = [
        {"step": 5, "loss": 0.4, "online/desirable_share": 0.6, "online/reward": 0.6},
        {"step": 5, "eval_loss": 0.3},
    ]
    fig = make_figure(history)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    lines = {line.get_label(): line for line in axes["Loss"].get_lines()}
    assert lines["loss"].get_marker() != lines["eval loss"].get_marker()
    assert {"desirable share", "reward"} <= {line.get_label() for line in axes["Online samples"].get_lines()}
