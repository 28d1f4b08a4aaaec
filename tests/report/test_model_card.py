"""Tests of trl_kto_ext.report.model_card: the README.md a run leaves in output_dir names the base, data, lambda and metrics."""

from conftest import cpu_args

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset


def test_card_after_three_steps(tiny_default, tmp_path):
    # 16 desirable and 48 undesirable rows: auto loss aversion gives lambda_D = 48 / 16 = 3, lambda_U = 1.
    train = make_kto_dataset(64, seed=0, desirable_ratio=0.25)
    labels = train["label"]
    n_d, n_u = sum(labels), len(labels) - sum(labels)
    args = cpu_args(tmp_path / "out", max_steps=3, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=8)
    trainer = KTOExtTrainer(
        tiny_default.model_dir,
        args=args,
        train_dataset=train,
        eval_dataset=make_kto_dataset(16, seed=1, split="heldout"),
        processing_class=tiny_default.load_tokenizer(),
    )
    trainer.train()
    path = trainer.create_model_card(dataset_name="tiny-arithmetic", command="trl-kto-ext --max_steps 3")
    card = open(path, encoding="utf-8").read()
    assert path == str(tmp_path / "out" / "README.md")

    assert (n_d, n_u) == (16, 48) and trainer.desirable_weight == 3.0 and trainer.undesirable_weight == 1.0
    assert f"λ_D = {trainer.desirable_weight:.6g}, λ_U = {trainer.undesirable_weight:.6g}" in card
    assert f"n_D = {n_d}, n_U = {n_u}" in card
    ratio = trainer.desirable_weight * n_d / (trainer.undesirable_weight * n_u)
    assert f"λ_D·n_D / (λ_U·n_U) = {ratio:.4g} " in card
    assert f"β = {args.beta}" in card
    assert f"the local model `{tiny_default.model_dir}`" in card and "`tiny-arithmetic`" in card
    assert "@article{ethayarajh2024kto," in card and "arXiv:2402.01306" in card
    assert "trl-kto-ext --max_steps 3" in card

    history = trainer.state.log_history
    last_train = [e for e in history if "rewards/margins" in e and "eval_loss" not in e][-1]
    last_eval = [e for e in history if "eval_loss" in e][-1]
    row = next(line for line in card.splitlines() if line.startswith("| rewards/margins |"))
    assert (
        row == f"| rewards/margins | {last_train['rewards/margins']:.4g} | {last_eval['eval_rewards/margins']:.4g} |"
    )
    train_loss = next(e["train_loss"] for e in history if "train_loss" in e)
    assert f"| train_loss (mean over the run) | {train_loss:.4g} | - |" in card
