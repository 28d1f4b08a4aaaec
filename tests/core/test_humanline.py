"""Humanline KTO: the per-token clamp against float64, the trainer's loss against a float64 computation from the
models' logits, reference syncing, LoRA and cached-reference refusals, config resolution, the card and the CLI."""

import math

import pytest
import torch
from conftest import cpu_args
from peft import LoraConfig

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.cli.offline import make_parser
from trl_kto_ext.cli.parsing import parse_args
from trl_kto_ext.logprobs.humanline import clamp_token_logratios
from trl_kto_ext.models.tiny import make_kto_dataset


def test_clamp_values_gradients_and_counts_match_float64():
    g = torch.Generator().manual_seed(0)
    policy = (torch.randn(4, 7, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    reference = torch.randn(4, 7, generator=g, dtype=torch.float64) * 0.5
    mask = (torch.rand(4, 7, generator=g) < 0.7).double()
    low, high = -1.0, 1.5
    summed, inside, tokens = clamp_token_logratios(policy, reference, mask, low, high)
    summed.sum().backward()
    p, r, m = policy.tolist(), reference.tolist(), mask.tolist()
    expected, grads, n_inside = [], [], 0
    for i in range(4):
        total, row_grad = 0.0, []
        for t in range(7):
            x = p[i][t] - r[i][t]
            within = low <= x <= high
            total += m[i][t] * min(max(x, low), high)
            row_grad.append(m[i][t] * (1.0 if within else 0.0))  # a clamped token: no gradient
            n_inside += int(m[i][t] == 1.0 and within)
        expected.append(total)
        grads.append(row_grad)
    assert summed.tolist() == pytest.approx(expected, rel=1e-14, abs=1e-14)
    assert policy.grad.tolist() == [pytest.approx(row) for row in grads]
    assert inside.item() == n_inside and tokens.item() == sum(map(sum, m))
    assert 0 < n_inside < tokens.item()  # both kinds of tokens occur


def per_token_float64(model, ids, attention, completion):
    """log softmax of the model's float64 logits at each completion token [B, T-1] (zero elsewhere)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logps * completion[:, 1:].double()


def humanline_kto_float64(trainer, batch, low, high):
    """The humanline KTO loss in Python floats from per-token float64 log-probs of policy and reference."""
    beta, lam_d, lam_u = trainer.beta, trainer.desirable_weight, trainer.undesirable_weight
    policy, ref = trainer.model, trainer.ref_model

    def clamped_sums(prefix):
        keys = (f"{prefix}input_ids", f"{prefix}attention_mask", f"{prefix}completion_mask")
        p = per_token_float64(policy, *(batch[k] for k in keys)).tolist()
        r = per_token_float64(ref, *(batch[k] for k in keys)).tolist()
        m = batch[keys[2]][:, 1:].tolist()
        sums, inside, count = [], 0, 0
        for pi, ri, mi in zip(p, r, m):
            ratios = [a - b for a, b, k in zip(pi, ri, mi) if k]
            sums.append(math.fsum(min(max(x, low), high) for x in ratios))
            inside += sum(low <= x <= high for x in ratios)
            count += len(ratios)
        return sums, inside / count

    rewards, unclamped = clamped_sums("")
    z0 = max(0.0, math.fsum(clamped_sums("KL_")[0]) / batch["KL_input_ids"].size(0))
    terms = []
    for r, desirable in zip(rewards, batch["label"].tolist()):
        lam, sign = (lam_d, 1.0) if desirable else (lam_u, -1.0)
        terms.append(lam * (1.0 - 1.0 / (1.0 + math.exp(-beta * sign * (r - z0)))))
    return math.fsum(terms) / len(terms), unclamped


@pytest.fixture
def humanline_trainer(tmp_path, small_model, tiny_tokenizer):
    def build(**overrides):
        args = cpu_args(tmp_path, per_device_train_batch_size=8, beta=0.5, humanline=True, **overrides)
        trainer = KTOExtTrainer(model=small_model, args=args, train_dataset=make_kto_dataset(32, seed=3),
                                processing_class=tiny_tokenizer)  # fmt: skip
        with torch.no_grad():  # a reference away from the policy: some tokens fall outside the bounds
            for i, parameter in enumerate(trainer.ref_model.parameters()):
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
        return trainer

    return build


def test_trainer_loss_and_unclamped_share_match_float64(humanline_trainer):
    low, high = -0.2, 0.3
    trainer = humanline_trainer(humanline_log_epsilon_P=low, humanline_log_epsilon_R=high)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    trainer.model.eval()  # no dropout: the float64 recomputation sees the same model
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    expected, unclamped = humanline_kto_float64(trainer, batch, low, high)
    assert 0.0 < unclamped < 1.0
    assert loss == pytest.approx(expected, rel=1e-5)
    assert trainer._metrics["eval"]["humanline/unclamped"][-1] == pytest.approx(unclamped, rel=1e-6)
    # The same batch without the clamp gives another loss: the bounds matter here.
    trainer.args.humanline_log_epsilon_P, trainer.args.humanline_log_epsilon_R = -100.0, 100.0
    with torch.no_grad():
        assert not math.isclose(trainer.compute_loss(trainer.model, dict(batch)).item(), expected, rel_tol=1e-4)


def test_reference_is_the_policy_after_each_sync(humanline_trainer):
    trainer = humanline_trainer(ref_model_sync_steps=2, max_steps=3, learning_rate=1e-2)

    def same():
        pairs = zip(trainer.model.parameters(), trainer.ref_model.parameters(), strict=True)
        return all(torch.equal(p, r) for p, r in pairs)

    assert not same()
    trainer.args.max_steps = 2
    trainer.train()
    assert same()  # synced at step 2 with alpha 1.0
    trainer.args.max_steps = 3
    trainer.train()  # a new run: synced at its step 2, then one more update
    assert not same()
    logged = [h for h in trainer.state.log_history if "humanline/unclamped" in h]
    assert logged and all(0.0 <= h["humanline/unclamped"] <= 1.0 for h in logged)


def test_lora_sync_is_refused_and_clamp_only_trains(tmp_path, small_model, tiny_tokenizer):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    data = make_kto_dataset(16, seed=1)
    with pytest.raises(ValueError, match="with LoRA the reference is the base model.*Set sync_ref_model=False"):
        KTOExtTrainer(model=small_model, args=cpu_args(tmp_path, humanline=True), train_dataset=data,
                      processing_class=tiny_tokenizer, peft_config=lora)  # fmt: skip
    args = cpu_args(tmp_path, humanline=True, sync_ref_model=False, max_steps=2)
    trainer = KTOExtTrainer(model=small_model, args=args, train_dataset=data, processing_class=tiny_tokenizer,
                            peft_config=lora)  # fmt: skip
    trainer.train()
    assert any("humanline/unclamped" in h for h in trainer.state.log_history)


def test_config_resolution_and_refusals(tmp_path):
    def config(**kw):
        return KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, **kw)

    on = config(humanline=True)
    assert (on.sync_ref_model, on.ref_model_mixup_alpha, on.ref_model_sync_steps) == (True, 1.0, 1)
    off = config()
    assert (off.sync_ref_model, off.ref_model_mixup_alpha, off.ref_model_sync_steps) == (False, 0.6, 512)
    given = config(humanline=True, ref_model_sync_steps=8, sync_ref_model=False)
    assert (given.sync_ref_model, given.ref_model_sync_steps) == (False, 8)
    with pytest.raises(ValueError, match="precompute_ref_log_probs caches per-sequence sums once"):
        config(humanline=True, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="must satisfy P <= 0 <= R"):
        config(humanline=True, humanline_log_epsilon_P=0.5)
    with pytest.raises(ValueError, match="ref_model_sync_steps"):
        config(humanline=True, ref_model_sync_steps=0)


def test_card_and_command_line(humanline_trainer):
    trainer = humanline_trainer(max_steps=1, ref_model_sync_steps=4)
    trainer.train()
    card = open(trainer.create_model_card()).read()
    assert "Humanline (arXiv 2509.24207): per-token log-ratio clamped to [-1, 1.5]" in card
    assert "Reference synced to the policy every 4 steps (π_ref = 1·π_θ + 0·π_ref)" in card
    argv = ["--output_dir", "x", "--use_cpu", "true", "--humanline", "true", "--humanline_log_epsilon_R", "2.0"]
    _, training_args, _, _ = parse_args(argv, make_parser())
    assert training_args.humanline and training_args.humanline_log_epsilon_R == 2.0
    assert training_args.sync_ref_model and training_args.ref_model_sync_steps == 1


def test_compare_script_quick(tiny_default, tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "humanline_compare.py"
    spec = importlib.util.spec_from_file_location("humanline_compare", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "humanline.json").read_text())
    assert set(summary["table"]) == {"offline_kto", "humanline", "online_kto"}
    humanline_runs = [r for r in summary["runs"] if r["method"] == "humanline"]
    assert humanline_runs and all(0.0 <= r["unclamped_mean"] <= 1.0 for r in humanline_runs)
    assert summary["table"]["humanline"]["sync"] == 1
