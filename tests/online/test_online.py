"""Online KTO: labels from rewards, KL pairing across prompts, rolling lambda, LoRA reference, determinism, the CLI
config, and one step's loss against a float64 recomputation (bad rewards and inputs: test_online_inputs.py)."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import sequence_logps
from peft import LoraConfig

from trl_kto_ext import OnlineKTOConfig, OnlineKTOTrainer
from trl_kto_ext.logprobs.reference import frozen_copy
from trl_kto_ext.models.tiny import exact_answer_reward, make_prompt_dataset
from trl_kto_ext.online.rewards import label_rewards
from trl_kto_ext.online.rolling_loss_aversion import RollingLossAversion

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["12+3=", "45+7=", "8+9=", "60+4=", "33+8=", "71+2="]


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model: a second thread only waits


def online_args(output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", per_device_train_batch_size=12, num_generations=3, max_completion_length=5, max_steps=3,
        learning_rate=1e-4, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, max_length=64, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return OnlineKTOConfig(**values)


def make_trainer(tiny_default, tmp_path, reward_funcs=exact_answer_reward, dataset=None, model=None, **overrides):
    return OnlineKTOTrainer(
        model=model if model is not None else tiny_default.load_model(),
        reward_funcs=reward_funcs,
        args=online_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else make_prompt_dataset(PROMPTS),
        processing_class=tiny_default.load_tokenizer(),
    )


def prompt_rows(n=4):
    return [{"prompt": p, "answer": str(sum(map(int, p[:-1].split("+"))))} for p in PROMPTS[:n]]


# ------------------------------------------------------------------------------------------------------- labels
def test_threshold_labels():
    assert label_rewards([1.0, 0.0, 0.5, 0.49, -2.0, 3.0], 3, "threshold", 0.5) == [
        True,
        False,
        True,
        False,
        False,
        True,
    ]


def test_relative_labels_ties_and_all_equal_groups():
    rewards = [1.0, 0.0, 0.0] + [2.0, 2.0, 2.0] + [1.0, 2.0, 3.0] + [0.2, 0.2, 0.5]
    # Group means: 1/3, 2 (all equal: left out), 2 (the 2.0 ties the mean: undesirable), 0.3.
    expected = [True, False, False] + [None, None, None] + [False, False, True] + [False, False, True]
    assert label_rewards(rewards, 3, "relative") == expected


def test_relative_labels_left_out_rows_are_counted_and_not_trained(tiny_default, tmp_path):
    def constant(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    trainer = make_trainer(tiny_default, tmp_path, reward_funcs=constant, label_mode="relative")
    trainer.model.train()
    batch = trainer._prepare_inputs(prompt_rows())
    assert batch == {"no_preference": True}
    assert trainer._metrics["train"]["count/left_out"] == [12]
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())
    assert trainer._metrics["train"]["skipped/no_preference_steps"] == [1]


# --------------------------------------------------------------------------------------------------- KL pairing
def test_kl_rows_pair_each_prompt_with_a_completion_of_another_prompt(tiny_default, tmp_path):
    trainer = make_trainer(tiny_default, tmp_path, one_class="train")  # every sample is a row
    checked = 0
    for _ in range(4):
        examples = trainer.sample(prompt_rows())
        batch = trainer.kl_collator([{k: ex[k] for k in ("prompt_ids", "completion_ids", "label")} for ex in examples])
        for i, ex in enumerate(examples):
            attended = batch["KL_attention_mask"][i].bool()
            completion = batch["KL_completion_mask"][i].bool()
            kl_prompt = batch["KL_input_ids"][i][attended & ~completion].tolist()
            kl_completion = batch["KL_input_ids"][i][completion].tolist()
            assert kl_prompt == ex["prompt_ids"]
            sources = {other["prompt"] for other in examples if other["completion_ids"] == kl_completion}
            assert sources - {ex["prompt"]}, f"KL completion {kl_completion} of row {i} has no other-prompt source"
            checked += 1
    assert checked == 4 * 12


# ------------------------------------------------------------------------------------------------------- lambda
def test_rolling_window_arithmetic():
    window = RollingLossAversion(window=2, mode="auto", target=4 / 3)
    steps = [(1, 7), (3, 5), (6, 2), (0, 4), (0, 3), (2, 1)]
    # By hand, window of 2 steps: (1,7) -> 4/3*7/1; (1+3, 7+5) -> 4/3*12/4; (3+6, 5+2) -> 4/3*7/9; (6+0, 2+4) ->
    # 4/3*6/6; (0, 7): one class only, the last weights are kept; (0+2, 3+1) -> 4/3*4/2.
    expected = [4 / 3 * 7, 4 / 3 * 3, 4 / 3 * 7 / 9, 4 / 3, 4 / 3, 4 / 3 * 2]
    counts = [(1, 7), (4, 12), (9, 7), (6, 6), (0, 7), (2, 4)]
    for (n_d, n_u), lam, (w_d, w_u) in zip(steps, expected, counts):
        resolved = window.update(n_d, n_u)
        assert resolved.desirable_weight == pytest.approx(lam, rel=1e-12)
        assert resolved.undesirable_weight == 1.0
        assert (resolved.n_desirable, resolved.n_undesirable) == (w_d, w_u)


def test_logged_lambda_follows_the_window_of_logged_counts(tiny_default, tmp_path):
    # one_class="train": every labelled completion is trained (the window counts all of them).
    trainer = make_trainer(tiny_default, tmp_path, max_steps=5, loss_aversion_window=2, loss_aversion_target=1.2,
                           one_class="train")  # fmt: skip
    trainer.train()
    logs = [e for e in trainer.state.log_history if "lambda_D" in e]
    assert len(logs) == 5
    counts = [(e.get("count/desirable", 0), e.get("count/undesirable", 0)) for e in logs]
    for step, entry in enumerate(logs):
        n_d = sum(d for d, _ in counts[max(0, step - 1) : step + 1])
        n_u = sum(u for _, u in counts[max(0, step - 1) : step + 1])
        assert (entry["window/n_desirable"], entry["window/n_undesirable"]) == (n_d, n_u)
        if n_d and n_u:
            assert entry["lambda_D"] == pytest.approx(1.2 * n_u / n_d, rel=1e-9)
            assert entry["loss_aversion_ratio"] == pytest.approx(1.2, rel=1e-9)
        # The 6 prompts give batches of 4 and 2 prompts (12 and 6 completions) in turn.
        assert counts[step][0] + counts[step][1] == (12 if step % 2 == 0 else 6)
        assert entry["online/desirable_share"] == pytest.approx(counts[step][0] / sum(counts[step]), rel=1e-9)
        assert entry["lambda_U"] == 1.0


# ---------------------------------------------------------------------------------------------------- reference
def test_lora_reference_is_the_base_model(tiny_default, tmp_path):
    base = tiny_default.load_model().eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")  # fmt: skip
    trainer = OnlineKTOTrainer(
        model=tiny_default.load_model(), reward_funcs=exact_answer_reward, args=online_args(tmp_path, one_class="train"),
        train_dataset=make_prompt_dataset(PROMPTS), processing_class=tiny_default.load_tokenizer(), peft_config=lora,
    )  # fmt: skip
    assert trainer.ref_model is None
    trainer.model.train()
    batch = trainer._prepare_inputs(prompt_rows())
    reference = trainer._reference_target_logps(batch)
    torch.testing.assert_close(reference, sequence_logps(base, batch), rtol=1e-5, atol=1e-5)
    kl_reference = trainer._reference_kl_logps(batch)
    torch.testing.assert_close(kl_reference, sequence_logps(base, batch, prefix="KL_"), rtol=1e-5, atol=1e-5)
    policy = sequence_logps(frozen_copy(trainer.model), batch)
    assert (policy - reference).abs().max() > 1e-3  # the adapters change the policy: the check can fail


# -------------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_samples_and_metrics(tiny_default, tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(tiny_default, tmp_path / name, max_steps=3)
        trainer.train()
        torch.manual_seed(7)
        samples = [(ex["completion"], ex["label"]) for ex in trainer.sample(prompt_rows())]
        history = [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
                   for e in trainer.state.log_history]  # fmt: skip
        runs.append((samples, history, [p.detach().clone() for p in trainer.model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))
    other = make_trainer(tiny_default, tmp_path / "c", max_steps=3, seed=1)
    other.train()
    assert [e.get("online/reward") for e in other.state.log_history] != [e.get("online/reward") for e in runs[0][1]]


# -------------------------------------------------------------------------------------------------------- CLI
def test_cli_config_smoke_run(tiny_default, tmp_path, capsys):
    from trl_kto_ext.__main__ import main

    out = tmp_path / "run"
    argv = ["online", "--config", str(ROOT / "configs" / "online-tiny.yaml"), "--max_steps", "3",
            "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Held-out greedy accuracy before online KTO:" in printed and "after online KTO:" in printed
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3]
    for entry in logs:
        n = entry["count/desirable"] + entry["count/undesirable"]
        # per_device_train_batch_size completions: trained, or left out with their prompt (all 8 samples one label)
        assert n + entry["count/left_out"] == 32
        assert entry["count/left_out"] == 8 * entry["count/one_class_prompts"]
        # The verifier's share of right samples, over all of them, left out or not.
        assert entry["online/desirable_share"] == pytest.approx(entry["online/rewards/exact_answer_reward"])
    assert (out / "training_curves.png").is_file()
    card = (out / "README.md").read_text()
    last = logs[-1]  # the card's lambda and counts are those of the last step's window
    assert f"λ_D = {last['lambda_D']:.6g}, λ_U = 1, n_D = {last['window/n_desirable']:.0f}" in card
    assert "trl-kto-ext online --config" in card


# ------------------------------------------------------------------------------------------------------- loss
def alternating_reward(prompts, completions, **kwargs):
    """1, 0, 1, 0, ... over the samples: every prompt's group gets both labels whatever the model samples."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def test_one_step_loss_matches_float64_recomputation(tiny_default, tmp_path):
    trainer = make_trainer(tiny_default, tmp_path, reward_funcs=alternating_reward, beta=0.3)
    with torch.no_grad():  # move the policy away from the reference, so the log-ratios are not all zero
        generator = torch.Generator().manual_seed(0)
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    trainer.model.train()
    batch = trainer._prepare_inputs(prompt_rows())
    loss = trainer.compute_loss(trainer.model, batch)

    labels = batch["label"].bool()
    n_d, n_u = int(labels.sum()), int((~labels).sum())
    assert n_d and n_u, "the batch needs both labels for the check to cover both branches"
    policy, reference = frozen_copy(trainer.model).double(), frozen_copy(trainer.ref_model).double()
    logratio = sequence_logps(policy, batch) - sequence_logps(reference, batch)
    kl = (sequence_logps(policy, batch, "KL_") - sequence_logps(reference, batch, "KL_")).mean().clamp(min=0)
    lam_d = n_u / n_d  # the window holds this step only: lambda_D = n_U / n_D, lambda_U = 1
    losses = [
        lam_d * (1 - 1 / (1 + math.exp(-0.3 * (r - kl.item()))))
        if y
        else 1.0 * (1 - 1 / (1 + math.exp(-0.3 * (kl.item() - r))))
        for r, y in zip(logratio.tolist(), labels.tolist())
    ]
    expected = sum(losses) / len(losses)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert trainer.desirable_weight == pytest.approx(lam_d)


def test_reward_model_scores_and_relative_labels(tiny_default, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = tiny_default.load_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    reward_model = LlamaForSequenceClassification(config).eval()
    trainer = OnlineKTOTrainer(
        model=tiny_default.load_model(), reward_funcs=reward_model, args=online_args(tmp_path, label_mode="relative"),
        train_dataset=make_prompt_dataset(PROMPTS), processing_class=tokenizer, reward_processing_classes=tokenizer,
    )  # fmt: skip
    examples = trainer.sample(prompt_rows())
    with torch.no_grad():  # one text at a time, no padding: an independent score
        expected = [
            reward_model(**tokenizer(ex["prompt"] + ex["completion"], return_tensors="pt", add_special_tokens=False))
            .logits[0, 0]
            .item()
            for ex in examples
        ]
    assert [ex["reward"] for ex in examples] == pytest.approx(expected, abs=1e-5)
    for start in range(0, 12, 3):
        group = expected[start : start + 3]
        mean = sum(group) / 3
        want = [None] * 3 if max(group) == min(group) else [r > mean for r in group]
        assert [ex["label"] for ex in examples[start : start + 3]] == want


def test_conversational_prompts(tiny_default, tmp_path):
    trainer = make_trainer(tiny_default, tmp_path, dataset=make_prompt_dataset(PROMPTS, conversational=True))
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS[:4]]
    examples = trainer.sample(rows)
    tokenizer = tiny_default.load_tokenizer()
    for ex in examples:
        ids = tokenizer.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ex["prompt_ids"] == ids["input_ids"]
        assert ex["completion"][0]["role"] == "assistant"
        text = ex["completion"][0]["content"]
        assert ex["reward"] == float(text.strip() == str(sum(map(int, ex["prompt"][0]["content"][:-1].split("+")))))


def test_evaluation_samples_the_eval_prompts(tiny_default, tmp_path):
    trainer = OnlineKTOTrainer(
        model=tiny_default.load_model(), reward_funcs=exact_answer_reward,
        args=online_args(tmp_path, per_device_eval_batch_size=6), train_dataset=make_prompt_dataset(PROMPTS),
        eval_dataset=make_prompt_dataset(PROMPTS[:4]), processing_class=tiny_default.load_tokenizer(),
    )  # fmt: skip
    metrics = trainer.evaluate()
    n_trained = metrics["eval_count/desirable"] + metrics["eval_count/undesirable"]
    assert n_trained + metrics["eval_count/left_out"] == 4 * 3  # 4 prompts x 3 samples
    assert metrics["eval_count/left_out"] == 3 * metrics["eval_count/one_class_prompts"]
    assert metrics["eval_online/desirable_share"] == pytest.approx(metrics["eval_online/rewards/exact_answer_reward"])
    assert math.isfinite(metrics["eval_loss"])


def test_resume_continues_the_same_samples_and_lambda_window(tiny_default, tmp_path):
    full = make_trainer(tiny_default, tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    resumed = make_trainer(tiny_default, tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    def steps_3_4(trainer):
        keys = ("loss", "online/reward", "lambda_D", "window/n_desirable", "window/n_undesirable")
        return [
            [e["step"], *(e.get(k) for k in keys)]  # a step that made no update logs no loss
            for e in trainer.state.log_history
            if e.get("step", 0) > 2 and "online/reward" in e
        ]

    assert len(steps_3_4(full)) == 2
    assert steps_3_4(resumed) == steps_3_4(full)  # lambda of step 3 depends on the window restored from the checkpoint
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))


def test_compare_script_quick(tiny_default, tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # as `python scripts/online_compare.py` finds its neighbours
    spec = importlib.util.spec_from_file_location("online_compare", ROOT / "scripts" / "online_compare.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "online.json").read_text())
    assert set(summary["table"]) == {"online_kto", "offline_kto", "grpo"}
    for method, row in summary["table"].items():
        runs = [r for r in summary["runs"] if r["method"] == method]
        assert row["heldout_per_seed"] == [r["heldout_accuracy"] for r in runs]
        assert all(r["seconds"] > 0 for r in runs)
    assert (tmp_path / "online.png").stat().st_size > 0


def test_cli_prompt_loading_shares_the_offline_loader(tmp_path, monkeypatch):
    """The online command reads prompts through the same loader as the offline one: CSV text as written, a renamed
    prompt column, and a Hub id under HF_HUB_OFFLINE failing at once in one line."""
    import datasets

    from trl_kto_ext.cli.online import OnlineScriptArguments, load_prompt_dataset

    path = tmp_path / "prompts.csv"
    path.write_text("question,answer\n007,7\n18+9,27\n")
    args = OnlineScriptArguments(dataset_name=str(path), prompt_column="question")
    prompts, heldout = load_prompt_dataset(args, seed=0)
    assert heldout is None
    assert prompts["prompt"] == ["007", "18+9"]  # text as written, not the numbers 7 and 18
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match=r"could not load the prompts from 'my-org/missing-prompts'.*HF_HUB_OFFLINE"):
        load_prompt_dataset(OnlineScriptArguments(dataset_name="my-org/missing-prompts"), seed=0)
