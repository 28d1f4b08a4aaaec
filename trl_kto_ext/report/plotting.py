"""Training curves of a KTO run (rewards, margins, z0, lambda_D/lambda_U, loss; online samples) from trainer_state."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

STATE_FILE = "trainer_state.json"
DEFAULT_PLOT_NAME = "training_curves.png"

# (panel title, y label, [(log key, legend label), ...]); eval_<key> curves are added when present. Each training point
# is the mean over its logging window (`logging_steps`), which the titles say.
PANELS = [
    ("Rewards", "beta * log-ratio", [("rewards/chosen", "chosen (desirable)"), ("rewards/rejected", "rejected")]),
    ("Reward margin", "chosen - rejected", [("rewards/margins", "margin")]),
    (
        "Reference point z0",
        "KL estimate",
        [
            ("kl", "kl: z0 = max(0, step's KL), window mean"),
            ("kl_raw", "kl_raw: step's KL before the clamp, window mean"),
        ],
    ),
    ("Loss aversion", "weight", [("lambda_D", "lambda_D"), ("lambda_U", "lambda_U")]),
    ("Loss", "loss", [("loss", "loss")]),
    # Online KTO (OnlineKTOTrainer) only: what the sampled completions earned.
    ("Online samples", "share / reward", [("online/desirable_share", "desirable share"), ("online/reward", "reward")]),
]
# Line styles per key, so that equal curves (lambda_D = lambda_U, or kl = kl_raw when z0 > 0) stay visible: the
# second is drawn dashed, with other markers, over a wide first line.
UNDER = dict(lw=4, alpha=0.5, marker="o", ms=10, mfc="none", mew=2)  # wide line, hollow ring
OVER = dict(lw=2, linestyle=":", marker="s", ms=4)  # dotted (eval curves are dashed), small filled square
STYLES = {"lambda_D": UNDER, "lambda_U": OVER, "kl": UNDER, "kl_raw": OVER}
WINDOW_NOTE = "each point: mean over a logging window"


def find_state_file(path: str | Path) -> Path:
    """`path` itself if it is a file, else `<path>/trainer_state.json`, else the one of its latest checkpoint-*."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"No such file or folder: {path}. Give a training output folder or a {STATE_FILE}.")
    if (path / STATE_FILE).is_file():
        return path / STATE_FILE
    checkpoints = [p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    for checkpoint in sorted(checkpoints, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        if (checkpoint / STATE_FILE).is_file():
            return checkpoint / STATE_FILE
    raise FileNotFoundError(
        f"No {STATE_FILE} in {path} or in any checkpoint-* folder inside it. Point to the output_dir of a run that "
        "has saved a checkpoint or finished training (the trainer writes the file at each save)."
    )


def load_log_history(state_file: str | Path) -> list[dict]:
    """The `log_history` list of a trainer_state.json (ValueError with the file name if it cannot be read)."""
    try:
        state = json.loads(Path(state_file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{state_file} is not valid JSON (line {err.lineno}: {err.msg}).") from None
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{state_file} has no `log_history` list; is it a transformers trainer_state.json?")
    return [entry for entry in history if isinstance(entry, dict)]


def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged metric; entries without it, or with a non-numeric value, are skipped."""
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in entry:
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def plot_training(output_dir_or_state_file: str | Path, out_path: str | Path | None = None) -> str:
    """Write a PNG of the KTO training curves against the step and return its path.

    Reads `trainer_state.json` (in the folder, or in its latest `checkpoint-*` subfolder). Panels: rewards/chosen vs
    rewards/rejected, rewards/margins, z0 (`kl`, `kl_raw`), lambda_D/lambda_U and loss, each with its `eval_` curves
    (dashed) when logged; a run too short to log a loss shows its final `train_loss`. Each training point is the mean
    over its logging window. Series missing from the log are skipped. Default output: `<folder>/training_curves.png`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = Path(output_dir_or_state_file).expanduser()
    state_file = find_state_file(source)
    history = load_log_history(state_file)
    if out_path is None:
        out_path = (source if source.is_dir() else state_file.parent) / DEFAULT_PLOT_NAME
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    run = source.name if source.is_dir() else state_file.parent.name
    if state_file.parent.name != run:  # read from the last checkpoint: say so
        run = f"{run} (from {state_file.parent.name})"
    fig = make_figure(history, f"KTO training curves: {run}", empty_note=str(state_file))
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return str(out_path)


def make_figure(history: list[dict], title: str = "KTO training curves", empty_note: str = ""):
    """The matplotlib Figure of `plot_training` for a `log_history` list (one Axes per panel with data)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = []
    for title_, ylabel, keys in PANELS:
        curves = []
        for color, (key, label) in enumerate(keys):
            # lambda_D / lambda_U are settings, not measurements: their eval_ copies would only repeat them.
            for prefix in ("", "eval_") if not key.startswith("lambda") else ("",):
                steps, values = series(history, prefix + key)
                if steps:
                    curves.append((steps, values, f"{prefix and 'eval '}{label}", key, bool(prefix), f"C{color}"))
        if key == "loss" and not any(not is_eval for *_, is_eval, _ in curves):  # no loss logged inside the run
            steps, values = series(history, "train_loss")
            if steps:
                curves.append((steps, values, "train_loss (mean over the run)", "train_loss", False, "C0"))
        if curves:
            panels.append((title_, ylabel, curves))

    n_cols = 2 if len(panels) > 1 else 1
    n_rows = max(1, -(-len(panels) // n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6.4 * n_cols, 3.4 * n_rows), squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax, (panel_title, ylabel, curves) in zip(flat, panels):
        for steps, values, label, key, is_eval, color in curves:  # a metric and its eval_ twin share a colour
            style = {"lw": 1.5, "marker": "o", "ms": 4, **STYLES.get(key, {})}
            if len(steps) >= 30:  # markers only where points are few (a short run's single dots stay visible)
                style["marker"] = None
            if is_eval:  # dashed, hollow diamonds: told apart from training points even where there is one point
                style.update(linestyle="--", lw=1.5, alpha=1.0, marker="D" if len(steps) < 30 else None, mfc="none")
            ax.plot(steps, values, color=color, label=label, **style)
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        last = max(max(steps) for steps, *_ in curves)
        ax.set_xlim(0, last + max(0.5, 0.03 * last))  # from step 0, so a short run gets whole-number ticks too
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in flat[len(panels) :]:
        ax.axis("off")
    if not panels:
        flat[0].text(0.5, 0.5, f"No KTO metrics logged yet in\n{empty_note}", ha="center", va="center")
    fig.suptitle(f"{title}\n({WINDOW_NOTE}; eval dashed)", fontsize=11)
    return fig


def main(argv: list[str]) -> int:
    """`trl-kto-ext plot OUTPUT_DIR [--out FILE.png]`: prints the PNG's path; SystemExit with a one-line message."""
    import argparse

    parser = argparse.ArgumentParser(prog="trl-kto-ext plot", description="Plot the KTO training curves of a run.")
    parser.add_argument("output_dir", help="Output folder of a run (or a trainer_state.json).")
    parser.add_argument("--out", default=None, help="PNG to write (default: OUTPUT_DIR/training_curves.png).")
    args = parser.parse_args(argv)
    try:
        path = plot_training(args.output_dir, args.out)
        print(path)
        if not any(key in entry for entry in load_log_history(find_state_file(Path(args.output_dir))) for key in
                   ("loss", "train_loss", "kl", "eval_loss")):  # fmt: skip
            print(
                "trl-kto-ext plot: no metrics were logged in this run yet, so the figure is empty (logging_steps larger "
                "than the steps run? set logging_steps=1 for short runs)",
                file=sys.stderr,
            )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"trl-kto-ext: error: {err}") from None
    return 0
