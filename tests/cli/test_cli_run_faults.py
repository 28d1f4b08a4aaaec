"""Faults found while the command line trains: the user's (a reward function's output or exception, a diverging loss)
stop with one line `trl-kto-ext: error: ...`; a bug keeps its traceback; a run in which no step made an update says
why on stderr and exits non-zero, its outputs saved. The reward functions below are passed by dotted path."""

import json

import pytest
import torch
from safetensors.torch import load_file

import trl_kto_ext.cli.run as cli_run
from trl_kto_ext.__main__ import main

ONLINE = ["online", "--model_name_or_path", "tiny", "--dataset_name", "tiny-arithmetic", "--max_steps", "2",
          "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "5",
          "--logging_steps", "1", "--report_to", "none", "--bf16", "false", "--tiny_train_prompts", "16"]  # fmt: skip


def one_reward(prompts, completions, **kwargs):
    return [1.0]


def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def raising_reward(prompts, completions, **kwargs):
    solutions = kwargs["solution"]  # the tiny prompts have `answer`, not `solution`
    return [float(c == s) for c, s in zip(completions, solutions)]


def compares_with_a_list(prompts, completions, answer, **kwargs):
    return [float(c == [a]) for c, a in zip(completions, answer)]  # always 0: the user's bug


def _fails(argv, capfd) -> str:
    """The one line the run stops with; nothing like a traceback printed."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err + printed.out
    message = str(info.value.code)
    assert message.startswith("trl-kto-ext: error: ") and "\n" not in message
    return message


@pytest.mark.parametrize(
    "reward,expected",
    [
        ("one_reward", "Reward function 'one_reward' returned 1 rewards for 8 completions: it must return exactly "
                       "one reward per completion, in the order of `completions`."),
        ("nan_reward", "Reward function 'nan_reward' returned nan for completion 0 (prompt "),
        ("raising_reward", f"Reward function 'raising_reward' raised KeyError: 'solution' at {__file__}, line "
                           f"{raising_reward.__code__.co_firstlineno + 1} (in raising_reward) on prompt "),
    ],
    ids=["wrong-count", "nan", "raises"],
)  # fmt: skip
def test_reward_function_fault_stops_in_one_line(tiny_default, tmp_path, capfd, reward, expected):
    argv = [*ONLINE, "--reward_funcs", f"test_cli_run_faults.{reward}", "--output_dir", str(tmp_path)]
    assert _fails(argv, capfd).startswith(f"trl-kto-ext: error: {expected}")


def test_run_without_any_update_warns_and_exits_non_zero(tiny_default, tmp_path, capfd):
    out = tmp_path / "run"
    argv = [*ONLINE, "--reward_funcs", "test_cli_run_faults.compares_with_a_list", "--output_dir", str(out)]
    with pytest.raises(SystemExit) as info:
        main(argv)
    printed = capfd.readouterr()
    assert str(info.value.code) == (
        f"trl-kto-ext: error: no training step made an update, so the model saved in {out} is the model the run "
        "started from (why and the likely fixes: the warning above)."
    )
    warnings = [line for line in printed.err.splitlines() if line.startswith("trl-kto-ext: warning: ")]
    assert len(warnings) == 2, printed.err
    assert warnings[0].startswith("trl-kto-ext: warning: Online KTO: no prompt of step 1 had both a desirable and")
    assert warnings[1].startswith("trl-kto-ext: warning: No training step of this run made an update: all 2 steps")
    assert "Every sample of the run got the same reward, 0" in warnings[1] and "lists of messages" in warnings[1]
    assert f"final model + tokenizer: {out}" in printed.out  # the outputs are saved and listed first
    saved = load_file(str(out / "model.safetensors"))
    start = tiny_default.load_model().state_dict()
    assert saved.keys() <= start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["skipped/no_preference_steps"] for e in history if "online/reward" in e] == [1, 1]
    assert not any("loss" in e or "train_loss" in e for e in history)  # no 0 reported as a loss


def test_internal_bug_during_training_keeps_its_traceback(tiny_default, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr("trl_kto_ext.online.trainer.label_rewards", broken)
    argv = [*ONLINE, "--reward_funcs", "test_cli_run_faults.compares_with_a_list", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="an internal bug"):  # not a SystemExit: the traceback is shown
        main(argv)


def test_offline_nonfinite_loss_stops_in_one_line(tiny_default, tmp_path, capfd, monkeypatch):
    build = cli_run.build_trainer

    def with_nan_model(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.model.model.norm.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        return trainer

    monkeypatch.setattr(cli_run, "build_trainer", with_nan_model)
    argv = ["--model_name_or_path", "tiny", "--dataset_name", "tiny-arithmetic", "--max_steps", "2", "--bf16",
            "false", "--report_to", "none", "--eval_strategy", "no", "--tiny_train_rows", "32", "--output_dir",
            str(tmp_path)]  # fmt: skip
    message = _fails(argv, capfd)
    assert message.startswith("trl-kto-ext: error: Non-finite training loss (nan) at step 1 (epoch 0.00); training ")
    assert "Likely causes: a learning rate too high" in message and message.endswith("set on_nonfinite_loss='skip'.")
