"""on_nonfinite_loss='skip': skipped steps are never logged as a loss value, and a run of them stops the run."""

import copy

import pytest
import torch
from conftest import cpu_args, logged_losses
from transformers import TrainerCallback

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset
from trl_kto_ext.training.guards import NonFiniteLossError


class NaNFrom(TrainerCallback):
    """Makes the policy's hidden states NaN during the optimizer steps in `steps` (1-based)."""

    def __init__(self, trainer, steps):
        self.trainer, self.steps, self.handle = trainer, set(steps), None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 in self.steps:
            norm = self.trainer.model.model.norm
            self.handle = norm.register_forward_hook(lambda module, inputs, output: output * float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def run(model, tokenizer, tmp_path, nan_steps, **overrides):
    values = dict(max_steps=4, on_nonfinite_loss="skip")
    values.update(overrides)
    trainer = KTOExtTrainer(
        model=copy.deepcopy(model),
        args=cpu_args(tmp_path, **values),
        train_dataset=make_kto_dataset(32, seed=0),
        processing_class=tokenizer,
    )
    trainer.add_callback(NaNFrom(trainer, nan_steps))
    return trainer


def by_step(trainer, key):
    return {h["step"]: h.get(key) for h in trainer.state.log_history if "grad_norm" in h}


def test_logged_loss_is_the_mean_over_the_steps_not_skipped(small_model, tiny_tokenizer, tmp_path):
    """Step 3 is skipped. Logged every step, steps 1, 2, 4 give the losses l1, l2, l4 and step 3 none; logged every
    2 steps the same run gives (l1 + l2) / 2 and l4, and the run's train_loss is (l1 + l2 + l4) / 3."""
    every = run(small_model, tiny_tokenizer, tmp_path / "a", nan_steps=[3])
    every.train()
    losses = by_step(every, "loss")
    assert losses[3] is None and None not in (losses[1], losses[2], losses[4])
    windows = run(small_model, tiny_tokenizer, tmp_path / "b", nan_steps=[3], logging_steps=2)
    windows.train()
    logged = by_step(windows, "loss")
    assert logged[2] == pytest.approx((losses[1] + losses[2]) / 2, rel=1e-6)
    assert logged[4] == pytest.approx(losses[4], rel=1e-6)  # not l4 / 2: the skipped step is not a loss of 0
    summary = next(h for h in windows.state.log_history if "train_loss" in h)
    assert summary["train_loss"] == pytest.approx((losses[1] + losses[2] + losses[4]) / 3, rel=1e-6)


def test_a_window_of_skipped_steps_logs_no_loss(small_model, tiny_tokenizer, tmp_path):
    trainer = run(small_model, tiny_tokenizer, tmp_path, nan_steps=[3, 4], logging_steps=2)
    trainer.train()
    assert by_step(trainer, "skipped/nonfinite_steps") == {2: None, 4: 2}
    assert list(by_step(trainer, "loss").values())[1] is None
    assert len(logged_losses(trainer)) == 1


def test_consecutive_nonfinite_steps_stop_the_run(small_model, tiny_tokenizer, tmp_path):
    """Steps 3, 4, 5 are non-finite; with a limit of 3 the run stops at step 5, before its update."""
    trainer = run(
        small_model, tiny_tokenizer, tmp_path, nan_steps=range(3, 20), max_steps=10, max_consecutive_nonfinite_steps=3
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    assert str(err.value).startswith(
        "3 consecutive training steps (steps 3 to 5) had a non-finite loss (nan) and were skipped "
        "(on_nonfinite_loss='skip'), which reached max_consecutive_nonfinite_steps=3: the run is no longer learning"
    )
    assert "raise max_consecutive_nonfinite_steps" in str(err.value)
    assert trainer.state.global_step == 4
    assert by_step(trainer, "loss") == {1: logged_losses(trainer)[0], 2: logged_losses(trainer)[1], 3: None, 4: None}


def test_a_finite_step_resets_the_count(small_model, tiny_tokenizer, tmp_path):
    """Two skipped steps, a good one, two skipped: never three in a row, so the run finishes."""
    trainer = run(
        small_model, tiny_tokenizer, tmp_path, nan_steps=[2, 3, 5, 6], max_steps=6, max_consecutive_nonfinite_steps=3
    )
    trainer.train()
    assert trainer.state.global_step == 6
    assert [s for s, v in by_step(trainer, "loss").items() if v is None] == [2, 3, 5, 6]


def test_float16_model_at_a_high_learning_rate_stops(tiny_default, tmp_path):
    """The reported case: float16 weights, lr 0.1. Every step from step 3 on is non-finite; the run stops after
    `max_consecutive_nonfinite_steps` of them instead of logging `loss: 0.0` to the end."""
    trainer = KTOExtTrainer(
        model=tiny_default.model_dir,
        args=cpu_args(
            tmp_path,
            max_steps=30,
            learning_rate=0.1,
            on_nonfinite_loss="skip",
            max_consecutive_nonfinite_steps=4,
            model_init_kwargs={"dtype": torch.float16},
        ),
        train_dataset=make_kto_dataset(64, seed=0),
    )
    with pytest.raises(NonFiniteLossError, match=r"^4 consecutive training steps \(steps 3 to 6\)") as err:
        trainer.train()
    assert "dtype: fp16 weights" in str(err.value)
    assert trainer.state.global_step == 5
    losses = by_step(trainer, "loss")
    assert [losses[s] is None for s in sorted(losses)] == [False, False, True, True, True]
    assert 0.0 not in losses.values()


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_consecutive_nonfinite_steps_must_be_a_positive_whole_number(tmp_path, value):
    with pytest.raises(ValueError, match=r"`max_consecutive_nonfinite_steps` must be a whole number of steps >= 1"):
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, max_consecutive_nonfinite_steps=value)
