"""Online KTO steps that make no update: their 0 never pulls the logged loss or the run's train_loss towards 0, and a
run in which no step made an update ends with a warning that the saved model is the starting one, and why."""

import logging

import pytest
import torch
from datasets import Dataset
from test_online import PROMPTS, make_trainer, prompt_rows

from trl_kto_ext.data.weights import add_weights
from trl_kto_ext.errors import UserFault, UserFunctionError, UserInputError
from trl_kto_ext.models.tiny import make_prompt_dataset
from trl_kto_ext.online.rewards import call_reward_func, combine_rewards

LOGGER = "trl_kto_ext.training.guards"


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model: a second thread only waits


def contrast_on_calls(calls):
    """A reward with both labels in every prompt of its n-th call (n counted from 0) when n is in `calls`, else 0 for
    every sample (a no-preference step); with groups of 3: [0, 1, 0], [1, 0, 1], ..."""
    count = [0]

    def reward(prompts, completions, **kwargs):
        n, count[0] = count[0], count[0] + 1
        return [float(i % 2) if n in calls else 0.0 for i in range(len(completions))]

    return reward


def record_losses(trainer):
    """The loss of each training micro-batch, in order, as `compute_loss` returns it (before transformers divides it
    by gradient_accumulation_steps)."""
    losses, compute = [], trainer.compute_loss

    def recorded(*args, **kwargs):
        out = compute(*args, **kwargs)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = recorded
    return losses


@pytest.mark.parametrize(
    "accumulation,trained,steps",
    [(1, {0, 2}, 3), (2, {0, 2, 3}, 2)],
    ids=["step-2-skipped", "accumulation-one-micro-batch-skipped"],
)
def test_skipped_steps_do_not_pull_the_logged_loss_to_zero(tiny_default, tmp_path, accumulation, trained, steps):
    """Logged once over the whole run, `loss` and `train_loss` are the mean loss of the micro-batches trained on: e.g.
    (l0 + l2) / 2 for losses l0, 0 (skipped), l2, where transformers alone reports (l0 + 0 + l2) / 3."""
    trainer = make_trainer(
        tiny_default, tmp_path, reward_funcs=contrast_on_calls(trained), max_steps=steps, logging_steps=steps,
        gradient_accumulation_steps=accumulation, per_device_train_batch_size=12 // accumulation,
        dataset=make_prompt_dataset(PROMPTS[:4]),  # 2 micro-batches of 2 prompts per epoch: every step has 2
    )  # fmt: skip
    losses = record_losses(trainer)
    result = trainer.train()
    assert len(losses) == steps * accumulation
    assert all(losses[i] == 0.0 for i in range(len(losses)) if i not in trained)  # the skipped micro-batches
    assert all(losses[i] > 0.0 for i in trained)
    expected = sum(losses[i] for i in trained) / len(trained)  # float64 mean over the trained micro-batches
    assert expected > sum(losses) / len(losses) * 1.2  # what an uncorrected mean would give is clearly lower
    window = [e for e in trainer.state.log_history if "loss" in e]
    assert len(window) == 1 and window[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert result.training_loss == pytest.approx(expected, rel=1e-5)  # train_loss
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert trainer.no_update_message is None  # some steps made an update


def test_window_of_skipped_steps_only_logs_no_loss(tiny_default, tmp_path):
    trainer = make_trainer(tiny_default, tmp_path, reward_funcs=contrast_on_calls({0}), max_steps=2)
    losses = record_losses(trainer)
    trainer.train()
    by_step = {e["step"]: e for e in trainer.state.log_history if "online/reward" in e}
    assert by_step[1]["loss"] == pytest.approx(losses[0], rel=1e-6)
    assert "loss" not in by_step[2] and by_step[2]["skipped/no_preference_steps"] == 1
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(losses[0], rel=1e-6)  # not losses[0] / 2


def test_run_without_any_update_says_so_at_its_end(tiny_default, tmp_path, caplog):
    """The user's bug: the reward compares the completion with a list, so every reward is 0 and no step trains."""

    def wrong_shape(prompts, completions, answer, **kwargs):
        return [float(c == [a]) for c, a in zip(completions, answer)]

    trainer = make_trainer(tiny_default, tmp_path, reward_funcs=wrong_shape, max_steps=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert said == [trainer.no_update_message]
    message = said[0]
    assert message.startswith("No training step of this run made an update: all 2 steps were skipped")
    assert "equals the model the run started from" in message
    assert "Every sample of the run got the same reward, 0" in message
    for fix in ("lists of messages", "`temperature` (now 0.5)", "`num_generations` (now 3)", "label_mode='relative'"):
        assert fix in message
    assert "train_loss" not in trainer.state.log_history[-1] and result.global_step == 2


def test_reward_output_faults_are_user_input_errors():
    prompts, completions, ids = ["1+1=", "2+2="], ["2", "5"], [[1], [2]]
    cases = {
        "short": (lambda **k: [1.0], "returned 1 rewards for 2 completions"),
        "nan": (lambda **k: [1.0, float("nan")], "returned nan for completion 1"),
        "inf": (lambda **k: [float("inf"), 0.0], "returned inf for completion 0"),
        "-inf": (lambda **k: [0.0, float("-inf")], "returned -inf for completion 1"),
        "text": (lambda **k: ["1", "0"], "returned '1' \\(str\\) for completion 0"),
    }
    for name, (func, words) in cases.items():
        with pytest.raises(UserInputError, match=words) as info:
            call_reward_func(func, name, prompts, completions, ids)
        assert isinstance(info.value, ValueError) and isinstance(info.value, UserFault)  # `except ValueError` works
    with pytest.raises(UserInputError, match="Every reward function \\(a, b\\) returned None for completion 0"):
        combine_rewards([[None, 1.0], [None, 0.0]], [1.0, 1.0], ["a", "b"], prompts)


def test_exception_in_a_reward_function_names_its_line():
    def needs_answer(prompts, completions, **kwargs):
        answers = kwargs["answer"]
        return [float(c == a) for c, a in zip(completions, answers)]

    line = needs_answer.__code__.co_firstlineno + 1
    with pytest.raises(UserFunctionError) as info:
        call_reward_func(needs_answer, "needs_answer", ["1+1="], ["2"], [[1]])
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, KeyError)
    assert str(info.value) == (
        f"Reward function 'needs_answer' raised KeyError: 'answer' at {__file__}, line {line} (in needs_answer) on "
        "prompt '1+1=' with completion '2'."
    )


def test_malformed_prompt_reaching_a_step_is_a_user_input_error(tiny_default, tmp_path):
    # A streamed prompt dataset is checked on its first row at start; a later row is checked when it is sampled.
    trainer = make_trainer(tiny_default, tmp_path)
    rows = prompt_rows(2) + [{"prompt": "  ", "answer": "0"}]
    with pytest.raises(UserInputError, match=r"^Prompt 2 of the batch of step 1 has prompt '  ': a prompt must be"):
        trainer.sample(rows)


def test_unusable_weight_in_a_batch_is_a_user_input_error():
    rows = Dataset.from_dict({"weight": [1.0, float("nan")]}).to_list()
    with pytest.raises(UserInputError, match=r"^The weight of row 1 of a training batch \(counting from 0\) is NaN"):
        add_weights({}, rows)
    assert add_weights({}, [{"weight": 2}, {"weight": 0.0}])["weight"].tolist() == [2.0, 0.0]
