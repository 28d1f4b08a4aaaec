"""Online KTO with bad input: a reward function's wrong output or exception, no prompts, a bad `num_generations`
or reward path, each stopped with an error that names the problem."""

import math
import re

import pytest
from datasets import Dataset
from test_online import PROMPTS, make_trainer, online_args, prompt_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model: a second thread only waits


def _sample_error(tiny_default, tmp_path, func, error=ValueError) -> str:
    trainer = make_trainer(tiny_default, tmp_path, reward_funcs=func)
    with pytest.raises(error) as info:
        trainer.sample(prompt_rows())
    return str(info.value)


def test_reward_of_wrong_length(tiny_default, tmp_path):
    def short(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    assert _sample_error(tiny_default, tmp_path, short) == (
        "Reward function 'short' returned 11 rewards for 12 completions: it must return exactly one reward per "
        "completion, in the order of `completions`."
    )


def test_reward_nan(tiny_default, tmp_path):
    def nan_on_second(prompts, completions, **kwargs):
        return [math.nan if p == "45+7=" else 1.0 for p in prompts]

    message = _sample_error(tiny_default, tmp_path, nan_on_second)
    assert re.fullmatch(
        r"Reward function 'nan_on_second' returned nan for completion 3 \(prompt '45\+7=', completion '.*'\): "
        r"rewards must be finite numbers \(a NaN or infinite reward cannot be compared with the others\)\. "
        r"Return a finite number, or None where the function does not apply\.",
        message,
    ), message


def test_reward_not_a_number(tiny_default, tmp_path):
    def words(prompts, completions, **kwargs):
        return ["good"] * len(completions)

    assert _sample_error(tiny_default, tmp_path, words) == (
        "Reward function 'words' returned 'good' (str) for completion 0 (prompt '12+3='): rewards must be numbers "
        "(int, float or bool), or None to abstain."
    )


def test_reward_exception_names_the_prompt(tiny_default, tmp_path):
    def picky(prompts, completions, answer, **kwargs):
        if "8+9=" in prompts:
            raise KeyError("no table for 8+9")
        return [1.0] * len(completions)

    message = _sample_error(tiny_default, tmp_path, picky, RuntimeError)
    line = picky.__code__.co_firstlineno + 2  # the `raise` in picky
    assert re.fullmatch(
        rf"Reward function 'picky' raised KeyError: 'no table for 8\+9' at {re.escape(__file__)}, line {line} "
        r"\(in picky\) on prompt '8\+9=' with completion '.*'\.",
        message,
    ), message


def test_reward_abstaining_everywhere(tiny_default, tmp_path):
    def abstain(prompts, completions, **kwargs):
        return [None] * len(completions)

    assert _sample_error(tiny_default, tmp_path, abstain) == (
        "Every reward function (abstain) returned None for completion 0 (prompt '12+3='): at least one must score "
        "each completion."
    )


def test_dataset_without_prompts(tiny_default, tmp_path):
    data = Dataset.from_dict({"question": PROMPTS})
    with pytest.raises(ValueError) as info:
        make_trainer(tiny_default, tmp_path, dataset=data)
    assert str(info.value) == (
        "The train dataset has no `prompt` column (columns: ['question']): online KTO samples its completions from "
        "the prompts. Rename the column holding them, e.g. `dataset.rename_column('question', 'prompt')`."
    )


def test_num_generations_below_one(tmp_path):
    with pytest.raises(ValueError) as info:
        online_args(tmp_path, num_generations=0)
    assert str(info.value) == "`num_generations` must be an integer >= 1 (completions sampled per prompt), got 0."


def test_unimportable_reward_path(tiny_default, tmp_path):
    with pytest.raises(ValueError, match=r"^Cannot import the reward function 'trl_kto_ext\.nope\.reward'"):
        make_trainer(tiny_default, tmp_path, reward_funcs="trl_kto_ext.nope.reward")
