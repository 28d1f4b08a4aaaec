"""Online KTO on samples without contrast: prompts whose samples all got one label are left out, a step left with
one class makes no update (counted, said once), `one_class="train"` trains on them; and why: training on a step of
only undesirable samples lowers the tiny model's held-out accuracy, skipping it leaves the model as it was."""

import logging

import pytest
import torch
from test_online import PROMPTS, make_trainer, online_args, prompt_rows

from trl_kto_ext import OnlineKTOConfig, OnlineKTOTrainer
from trl_kto_ext.models.tiny import greedy_accuracy, heldout_prompts, make_prompt_dataset
from trl_kto_ext.online.one_class import drop_one_class_groups

LOGGER = "trl_kto_ext.online.trainer"


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model: a second thread only waits


def always(value):
    def reward(prompts, completions, **kwargs):
        return [value] * len(completions)

    return reward


def by_position(pattern_per_prompt):
    """Reward of the j-th sample of prompt p: pattern_per_prompt[p][j] (samples come prompt-major)."""

    def reward(prompts, completions, **kwargs):
        group = len(completions) // len(pattern_per_prompt)
        return [float(pattern_per_prompt[i // group][i % group]) for i in range(len(completions))]

    return reward


def test_drop_one_class_groups_by_hand():
    T, F = True, False
    labels = [T, T, T] + [F, F, F] + [T, F, F] + [None, None, None] + [None, T, T] + [F, None, T]
    kept, all_d, all_u = drop_one_class_groups(labels, 3)
    assert kept == [None] * 3 + [None] * 3 + [T, F, F] + [None] * 3 + [None] * 3 + [F, None, T]
    assert (all_d, all_u) == (2, 1)  # [T,T,T] and [None,T,T] all desirable; [F,F,F] all undesirable
    assert drop_one_class_groups([T, F, F], 1) == ([T, F, F], 0, 0)  # single samples: no group to compare with
    with pytest.raises(ValueError, match="multiple of the group size"):
        drop_one_class_groups([T, F], 3)


def test_one_class_setting_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"`one_class` must be one of \('skip', 'train'\)"):
        OnlineKTOConfig(output_dir=str(tmp_path), one_class="drop", per_device_train_batch_size=8)
    assert OnlineKTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8).one_class == "skip"


def test_one_class_prompts_are_left_out_and_counted(tiny_default, tmp_path):
    # 4 prompts x 3 samples: all desirable, all undesirable, and two mixed prompts.
    pattern = [[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 1]]
    trainer = make_trainer(tiny_default, tmp_path, reward_funcs=by_position(pattern))
    trainer.model.train()
    examples = trainer.sample(prompt_rows())
    assert [ex["verdict"] for ex in examples] == [bool(r) for group in pattern for r in group]
    assert [ex["label"] for ex in examples] == [None] * 6 + [True, False, False, False, True, True]
    metrics = trainer._metrics["train"]
    assert metrics["count/one_class_prompts"] == [2]
    assert metrics["count/left_out"] == [6]
    assert metrics["online/desirable_share"] == [pytest.approx(6 / 12)]  # over every sample's verdict
    assert metrics["window/n_desirable"] == [3] and metrics["window/n_undesirable"] == [3]  # kept rows only


def test_kept_rows_of_one_prompt_pair_with_left_out_samples_of_others(tiny_default, tmp_path):
    # Only prompt 3 has both labels; on the first step the batch alone has no other prompt for its KL rows.
    trainer = make_trainer(
        tiny_default, tmp_path, reward_funcs=by_position([[0, 0, 0], [1, 1, 1], [1, 0, 1], [0] * 3])
    )
    trainer.model.train()
    sampled = []
    sample = trainer.sample
    trainer.sample = lambda rows: sampled.extend(sample(rows)) or sampled
    batch = trainer._prepare_inputs(prompt_rows())
    assert batch["label"].tolist() == [True, False, True]
    kept_prompt = tiny_default.load_tokenizer()(PROMPTS[2])["input_ids"]
    for i in range(3):
        attended, completion = batch["KL_attention_mask"][i].bool(), batch["KL_completion_mask"][i].bool()
        assert batch["KL_input_ids"][i][attended & ~completion].tolist() == kept_prompt
        partner = batch["KL_input_ids"][i][completion].tolist()
        sources = {ex["prompt"] for ex in sampled if ex["completion_ids"] == partner}
        assert sources - {PROMPTS[2]}, f"KL row {i}: completion {partner} was not sampled for another prompt"


def test_step_without_a_desirable_sample_makes_no_update_and_says_why_once(tiny_default, tmp_path, caplog):
    trainer = make_trainer(tiny_default, tmp_path, reward_funcs=always(0.0), max_steps=3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    logs = [e for e in trainer.state.log_history if "online/reward" in e]
    assert [e["skipped/no_preference_steps"] for e in logs] == [1, 1, 1]
    assert [e["count/one_class_prompts"] for e in logs] == [4, 2, 4]  # batches of 4 and 2 prompts in turn
    assert all(e["online/desirable_share"] == 0 for e in logs)
    said = [r.getMessage() for r in caplog.records if "made no update" in r.getMessage()]
    assert len(said) == 1, said
    assert "step 1" in said[0] and "lower `temperature`" in said[0] and "one_class='train'" in said[0]


def test_single_sample_steps_skip_when_one_class(tiny_default, tmp_path, caplog):
    # num_generations=1: no groups; a step whose samples are all undesirable is skipped as a whole.
    trainer = make_trainer(tiny_default, tmp_path, reward_funcs=always(0.0), num_generations=1,
                           per_device_train_batch_size=4)  # fmt: skip
    trainer.model.train()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert trainer._prepare_inputs(prompt_rows()) == {"no_preference": True}
    assert "step 1 had no desirable sample among its 4 labelled samples" in caplog.text
    assert trainer._metrics["train"]["count/one_class_prompts"] == [0]


def test_train_mode_trains_one_class_steps_and_names_lambda(tiny_default, tmp_path, caplog):
    trainer = make_trainer(tiny_default, tmp_path, reward_funcs=always(0.0), max_steps=2, one_class="train")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    said = [r.getMessage() for r in caplog.records if "one_class='train'" in r.getMessage()]
    assert len(said) == 1 and "auto lambda cannot balance a missing class" in said[0]
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e.get("skipped/no_preference_steps", 0) for e in logs] == [0, 0]
    assert [e["lambda_D"] for e in logs] == [1.0, 1.0]  # no window with both classes yet: 1 and 1


def test_undesirable_only_steps_harm_the_tiny_model_and_skipping_prevents_it(tiny_default, tmp_path):
    """The failure the rule exists for, on the tiny model: every sample labelled undesirable (as a weak model's
    samples at a high temperature are), 8 steps. Trained on, held-out greedy accuracy falls; skipped, it stays."""
    tokenizer = tiny_default.load_tokenizer()
    prompts, answers = heldout_prompts()
    prompts, answers = prompts[:200], answers[:200]
    base = greedy_accuracy(tiny_default.load_model(), tokenizer, prompts, answers)
    results = {}
    for mode in ("train", "skip"):
        trainer = OnlineKTOTrainer(
            model=tiny_default.load_model(), reward_funcs=always(0.0),
            args=online_args(tmp_path / mode, max_steps=8, learning_rate=1e-3, one_class=mode),
            train_dataset=make_prompt_dataset(PROMPTS), processing_class=tokenizer,
        )  # fmt: skip
        trainer.train()
        results[mode] = greedy_accuracy(trainer.model, tokenizer, prompts, answers)
    assert results["skip"] == base
    assert results["train"] < base - 0.1, (base, results)  # measured 0.59 -> 0.42
