"""One-class training data: KTO's loss is defined for one class (each row is compared with z0 alone), so the trainer
trains on it, as `trl.KTOTrainer` does, and says in one line what lambda_D / lambda_U mean then."""

import copy
import math

import pytest
import torch
from conftest import collated_batch, cpu_args, sequence_logps
from datasets import Dataset
from test_loss import reference_kto

from trl_kto_ext import KTOExtTrainer, resolve_loss_aversion
from trl_kto_ext.models.tiny import make_kto_dataset

# (desirable rows?, loss_aversion, weights given, expected (lambda_D, lambda_U))
CASES = [
    (True, "auto", {}, (1.0, 1.0)),
    (False, "auto", {}, (1.0, 1.0)),
    (True, "manual", {"desirable_weight": 2.5}, (2.5, 1.0)),
    (False, "manual", {"undesirable_weight": 1.5}, (1.0, 1.5)),
]


def _line(printed: str) -> str:
    return next(line for line in printed.splitlines() if line.startswith("KTO loss aversion"))


@pytest.mark.parametrize("desirable,mode,weights,expected", CASES)
def test_one_class_training_set_trains_with_one_line_on_lambda(
    small_model, tiny_tokenizer, tmp_path, capsys, desirable, mode, weights, expected
):
    dataset = make_kto_dataset(12, seed=7, desirable_ratio=1.0 if desirable else 0.0)
    trainer = KTOExtTrainer(
        model=small_model, args=cpu_args(tmp_path, loss_aversion=mode, **weights), train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )  # fmt: skip
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert (trainer.desirable_weight, trainer.undesirable_weight) == expected
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # it trained
    present, missing = ("desirable", "undesirable") if desirable else ("undesirable", "desirable")
    used, unused = ("lambda_D", "lambda_U") if desirable else ("lambda_U", "lambda_D")
    source = (
        "auto has no class to balance and falls back to lambda_D = lambda_U = 1"
        if mode == "auto"
        else "the manual weights are kept"
    )
    n_d, n_u = (12, 0) if desirable else (0, 12)
    assert _line(capsys.readouterr().out) == (
        f"KTO loss aversion ({mode}): lambda_D={expected[0]:.4g}, lambda_U={expected[1]:.4g}, n_D={n_d}, n_U={n_u}: "
        f"only {present} rows, so each row is compared with z0 alone and lambda_D*n_D/(lambda_U*n_U) is undefined; "
        f"{source}: {used}={expected[0 if desirable else 1]:.4g} only scales the loss and {unused} is unused."
    )
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 3
    side, other = ("chosen", "rejected") if desirable else ("rejected", "chosen")
    for step in steps:
        assert (step["lambda_D"], step["lambda_U"]) == expected
        assert "loss_aversion_ratio" not in step and "rewards/margins" not in step and f"rewards/{other}" not in step
        assert f"rewards/{side}" in step and step[f"count/{present}"] == 4 and step[f"count/{missing}"] == 0
        assert all(math.isfinite(v) for v in step.values() if isinstance(v, float))


@pytest.mark.parametrize("desirable,mode,weights,expected", CASES)
def test_one_class_batch_loss_equals_the_formula_in_float64(
    small_model, tiny_tokenizer, tmp_path, desirable, mode, weights, expected
):
    reference = copy.deepcopy(small_model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    trainer = KTOExtTrainer(
        model=copy.deepcopy(small_model), ref_model=reference, processing_class=tiny_tokenizer,
        args=cpu_args(tmp_path, loss_aversion=mode, beta=0.5, **weights),
        train_dataset=make_kto_dataset(12, seed=8, desirable_ratio=1.0 if desirable else 0.0),
    )  # fmt: skip
    batch = collated_batch(trainer, n_rows=6)
    assert batch["label"].tolist() == [desirable] * 6
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    models64 = [copy.deepcopy(m).double() for m in (trainer.model, trainer.ref_model)]
    policy, ref = (sequence_logps(m, batch).tolist() for m in models64)
    kl_policy, kl_ref = (sequence_logps(m, batch, "KL_").tolist() for m in models64)
    wanted, z0, _ = reference_kto(policy, ref, kl_policy, kl_ref, [desirable] * 6, 0.5, *expected)
    assert z0 > 0.05  # the reference point enters the loss
    assert loss == pytest.approx(wanted, rel=1e-5)


def test_trl_scenario_rows_fully_truncated_by_max_length_are_dropped(small_model, tiny_tokenizer, tmp_path):
    """TRL's `test_fully_truncated_completion_examples_dropped`: the prompt of the undesirable row fills max_length,
    so it is dropped and one desirable row is left; the trainer is built on it, as TRL's is."""
    dataset = Dataset.from_dict(
        {
            "prompt": ["Hi", "This is a very long prompt that fills up the whole max_length budget on its own"],
            "completion": [" there", " yes"],
            "label": [True, False],
        }
    )
    trainer = KTOExtTrainer(
        model=small_model, args=cpu_args(tmp_path, max_length=6), train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )  # fmt: skip
    assert len(trainer.train_dataset) == 1
    assert trainer.train_dataset[0]["prompt_ids"] == tiny_tokenizer("Hi")["input_ids"]
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (1, 0)
    assert (trainer.desirable_weight, trainer.undesirable_weight) == (1.0, 1.0)


def test_trl_scenario_with_two_prompts_left_trains(small_model, tiny_tokenizer, tmp_path, capsys):
    dataset = Dataset.from_dict(
        {
            "prompt": ["Hi", "Yo", "This is a very long prompt that fills up the whole max_length budget on its own"],
            "completion": [" there", " man", " yes"],
            "label": [True, True, False],
        }
    )
    trainer = KTOExtTrainer(
        model=small_model, args=cpu_args(tmp_path, max_length=6, max_steps=2, per_device_train_batch_size=2),
        train_dataset=dataset, processing_class=tiny_tokenizer,
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2
    assert "n_D=2, n_U=0: only desirable rows" in _line(capsys.readouterr().out)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_one_class_vision_rows_train(tmp_path, capsys):
    from test_vlm import _rows, _trainer
    from vlm_helpers import build_vlm_processor

    rows = [{**row, "label": False} for row in _rows(n=8)]
    trainer = _trainer(build_vlm_processor(), rows, tmp_path, max_steps=1)
    trainer.train()
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (0, 8)
    assert "only undesirable rows" in _line(capsys.readouterr().out)
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_resolve_loss_aversion_of_one_class_and_of_no_rows():
    assert resolve_loss_aversion(0, 5)[:6] == (1.0, 1.0, 0, 5, "auto", "")  # then the weighted masses (None)
    manual = resolve_loss_aversion(7, 0, mode="manual", desirable_weight=3.0, undesirable_weight=2.0)
    assert manual[:5] == (3.0, 2.0, 7, 0, "manual") and math.isnan(manual.ratio)  # no range warning either
    assert manual.missing_class == "undesirable"
    with pytest.raises(ValueError, match=r"no rows to count \(n_D=0, n_U=0\)"):
        resolve_loss_aversion(0, 0)


def test_one_class_in_the_rolling_window_of_online_kto():
    """Online KTO keeps its own policy for one-class steps (the last two-class weights, 1 and 1 before any); the
    shared LossAversion of such a window has an undefined ratio (NaN), never a ZeroDivisionError."""
    from trl_kto_ext.online.rolling_loss_aversion import RollingLossAversion

    window = RollingLossAversion(window=2, mode="auto")
    first = window.update(4, 0)
    assert (first.desirable_weight, first.undesirable_weight) == (1.0, 1.0) and math.isnan(first.ratio)
    assert window.update(1, 3).desirable_weight == pytest.approx(3 / 5)
    assert window.update(0, 2).desirable_weight == pytest.approx(5.0)  # window (1, 3) + (0, 2): both classes
    kept = window.update(0, 2)  # window (0, 2) + (0, 2): one class, the last weights are kept
    assert kept.desirable_weight == pytest.approx(5.0) and kept.missing_class == "desirable"
