"""The command line trains on a data file of one class (thumbs-up only or thumbs-down only), with the trainer's line
on what lambda_D / lambda_U mean then, and records it in the model card."""

import json
from pathlib import Path

import pytest
from test_cli import FAST, TINY_CONFIG

from trl_kto_ext.__main__ import main


@pytest.mark.parametrize(
    "desirable,flags,expected",
    [(True, [], (1.0, 1.0)), (False, ["--loss_aversion", "manual", "--undesirable_weight", "1.5"], (1.0, 1.5))],
    ids=["thumbs-up-auto", "thumbs-down-manual"],
)
def test_cli_trains_on_one_class(tiny_default, tmp_path, capsys, desirable, flags, expected):
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a + (0 if desirable else 1)), "label": desirable}
            for a in range(24)]  # fmt: skip
    data = tmp_path / "log.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    argv = ["--config", TINY_CONFIG, "--dataset_name", str(data), "--output_dir", str(out), *FAST]
    assert main([*argv, "--eval_strategy", "no", *flags]) == 0
    present, missing = ("desirable", "undesirable") if desirable else ("undesirable", "desirable")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KTO loss aversion"))
    n_d, n_u = (24, 0) if desirable else (0, 24)
    assert line.startswith(
        f"KTO loss aversion ({'auto' if desirable else 'manual'}): lambda_D={expected[0]:.4g}, "
        f"lambda_U={expected[1]:.4g}, n_D={n_d}, n_U={n_u}: only {present} rows, so each row is compared with z0 alone"
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 3 and all((h["lambda_D"], h["lambda_U"]) == expected for h in steps)
    assert not any("loss_aversion_ratio" in h for h in history)
    card = Path(out / "README.md").read_text()
    assert f"λ_D·n_D / (λ_U·n_U) = undefined (no {missing} rows)" in card
