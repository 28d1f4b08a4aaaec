"""KTOExtTrainer end to end: TRL parity of the loss, shuffled sampler, loss aversion, logged metrics, bad config."""

import copy
import math
import warnings

import pytest
import torch
from conftest import cpu_args
from trl import KTOConfig, KTOTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset
from trl_kto_ext.report import step_metrics


def perturb_(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_loss_equals_trl_kto_trainer_on_the_same_batch(small_model, tiny_tokenizer, tmp_path):
    """Same model, same frozen reference, same collated batch (KL rows fixed): same loss as TRL's trainer."""
    dataset = make_kto_dataset(32, seed=0, desirable_ratio=0.4)
    reference = copy.deepcopy(small_model)
    policy = copy.deepcopy(small_model)
    common = dict(beta=0.3, desirable_weight=1.2, undesirable_weight=0.9)
    trl_args = KTOConfig(
        **{k: v for k, v in vars(cpu_args(tmp_path / "trl")).items() if k in KTOConfig.__dataclass_fields__},
    )
    trl_args.train_sampling_strategy = "sequential"
    for key, value in common.items():
        setattr(trl_args, key, value)
    trl_trainer = KTOTrainer(
        model=policy, ref_model=reference, args=trl_args, train_dataset=dataset, processing_class=tiny_tokenizer
    )
    ours = KTOExtTrainer(
        model=copy.deepcopy(small_model),
        ref_model=copy.deepcopy(small_model),
        args=cpu_args(tmp_path / "ours", loss_aversion="manual", **common),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    perturb_(trl_trainer.model)
    perturb_(ours.model)  # same seed: both policies move away from the reference identically

    # A batch with explicit KL completions, collated by TRL's collator, fed to both trainers.
    rows = [trl_trainer.train_dataset[i] for i in range(8)]
    examples = [
        {"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"], "label": r["label"],
         "KL_completion_ids": rows[(i + 3) % 8]["completion_ids"]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    batch = DataCollatorForUnpairedPreference(pad_token_id=tiny_tokenizer.pad_token_id)(examples)
    trl_trainer.model.train()
    ours.model.train()
    trl_loss = trl_trainer.compute_loss(trl_trainer.model, dict(batch))
    our_loss = ours.compute_loss(ours.model, dict(batch))
    assert math.isfinite(our_loss.item())
    assert our_loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    ours_m = {k: [v] for k, v in step_metrics.summarize(ours, "train").items()}  # this batch alone
    trl_m = trl_trainer._metrics["train"]
    assert ours_m["kl"][-1] == pytest.approx(trl_m["kl"][-1], abs=1e-6)
    for side in ("chosen", "rejected"):
        assert ours_m[f"logps/{side}"][-1] == pytest.approx(trl_m[f"logps/{side}"][-1], rel=1e-5)
        # rewards are beta x differences of summed log-probs: within 1e-5 relative to those sums (the reference here
        # runs each prompt once for its target and KL row, TRL's twice: float32 rounds the two differently)
        scale = common["beta"] * abs(trl_m[f"logps/{side}"][-1])
        assert ours_m[f"rewards/{side}"][-1] == pytest.approx(trl_m[f"rewards/{side}"][-1], rel=1e-5, abs=1e-5 * scale)


def test_shuffled_sampler_trains_and_logs_lambda_and_kl_raw(tiny_default, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_default.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_default.model_dir)
    args = cpu_args(tmp_path, max_steps=4, per_device_train_batch_size=5)
    assert args.train_sampling_strategy == "random"
    trainer = KTOExtTrainer(
        model=model, args=args, train_dataset=make_kto_dataset(60, seed=1), processing_class=tokenizer
    )
    sampler = trainer._get_train_sampler(trainer.train_dataset)
    assert type(sampler).__name__ == "RandomSampler"
    trainer.train()
    assert "lambda_D=" in capsys.readouterr().out
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for key in ("lambda_D", "lambda_U", "loss_aversion_ratio", "kl", "kl_raw"):
            assert key in entry and math.isfinite(entry[key])
        assert entry["count/desirable"] + entry["count/undesirable"] == 5
        assert entry["kl"] == max(0.0, entry["kl_raw"])
        assert not any(isinstance(v, float) and math.isnan(v) for v in entry.values())


def test_auto_lambda_on_imbalanced_set(small_model, tiny_tokenizer, tmp_path):
    dataset = make_kto_dataset(100, seed=2, desirable_ratio=0.2)  # 1 desirable : 4 undesirable
    target = 1.25
    trainer = KTOExtTrainer(
        model=small_model,
        args=cpu_args(tmp_path, loss_aversion_target=target, max_steps=2),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    assert trainer.loss_aversion.n_desirable == 20 and trainer.loss_aversion.n_undesirable == 80
    assert trainer.desirable_weight == pytest.approx(4 * target)
    assert trainer.undesirable_weight == 1.0
    assert trainer.loss_aversion.ratio == pytest.approx(target)
    trainer.train()
    entry = next(h for h in trainer.state.log_history if "loss" in h)
    assert entry["lambda_D"] == pytest.approx(5.0) and entry["loss_aversion_ratio"] == pytest.approx(target)


def test_batch_size_one_and_short_last_batch(small_model, tiny_tokenizer, tmp_path):
    dataset = make_kto_dataset(7, seed=3)
    for batch_size in (1, 3):  # 7 rows in batches of 3 leave a last batch of 1
        trainer = KTOExtTrainer(
            model=copy.deepcopy(small_model),
            args=cpu_args(tmp_path, per_device_train_batch_size=batch_size, max_steps=-1, num_train_epochs=1),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert losses and all(math.isfinite(x) for x in losses)


def test_conversational_data_and_plain_trl_config(small_model, tiny_tokenizer, tmp_path):
    dataset = make_kto_dataset(20, seed=4, conversational=True)
    args = KTOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1,
    )  # fmt: skip
    trainer = KTOExtTrainer(model=small_model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    assert isinstance(trainer.args, KTOExtConfig)
    first = trainer.train_dataset[0]
    rendered = tiny_tokenizer.decode(first["prompt_ids"])
    assert "<|user|>" in rendered and "<|assistant|>" in rendered  # the chat template was applied
    trainer.train()


def test_eval_metrics_use_eval_prefix(small_model, tiny_tokenizer, tmp_path):
    trainer = KTOExtTrainer(
        model=small_model,
        args=cpu_args(tmp_path, per_device_eval_batch_size=3),
        train_dataset=make_kto_dataset(20, seed=5),
        eval_dataset=make_kto_dataset(10, seed=6, split="heldout"),
        processing_class=tiny_tokenizer,
    )
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_kl", "eval_kl_raw", "eval_rewards/chosen", "eval_lambda_D"):
        assert key in metrics and math.isfinite(metrics[key])
    assert metrics["eval_count/desirable"] + metrics["eval_count/undesirable"] == 10


@pytest.mark.parametrize("target", [0.9, 1.4, 2.0])
def test_loss_aversion_target_outside_range_is_a_clear_error(target, tmp_path):
    with pytest.raises(ValueError, match=r"outside \[1, 4/3\]"):
        KTOExtConfig(output_dir=str(tmp_path), loss_aversion_target=target)


def test_weights_with_auto_switch_to_manual_with_a_message(tmp_path):
    with pytest.warns(UserWarning, match="loss_aversion is 'manual'"):
        args = KTOExtConfig(output_dir=str(tmp_path), desirable_weight=2.0)
    assert args.loss_aversion == "manual"


def test_manual_weights_out_of_range_warn_once(small_model, tiny_tokenizer, tmp_path):
    dataset = make_kto_dataset(40, seed=8, desirable_ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = KTOExtTrainer(
            model=small_model,
            args=cpu_args(tmp_path, loss_aversion="manual", desirable_weight=3.0),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
    messages = [str(w.message) for w in caught if "outside [1, 4/3]" in str(w.message)]
    assert len(messages) == 1
    assert trainer.desirable_weight == 3.0 and trainer.loss_aversion.ratio == pytest.approx(3.0)


def test_weight_advice_is_given_once_not_again_by_trl(small_model, tiny_tokenizer, tmp_path, caplog):
    """TRL logs its own (differently rounded) weight advice for imbalanced data; ours is the one given."""
    dataset = make_kto_dataset(40, seed=8, desirable_ratio=0.25)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        KTOExtTrainer(
            model=small_model,
            args=cpu_args(tmp_path, loss_aversion="manual", desirable_weight=1.0),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
    assert sum("outside [1, 4/3]" in str(w.message) for w in caught) == 1
    assert not [r for r in caplog.records if "ideal range" in r.getMessage()]


def test_non_boolean_labels_are_a_clear_error(small_model, tiny_tokenizer, tmp_path):
    dataset = make_kto_dataset(6, seed=9).map(lambda r: {"label": "maybe"})
    with pytest.raises(ValueError, match=r"Unrecognised label 'maybe' at row 0 \(counting from 0\) of the train"):
        KTOExtTrainer(
            model=small_model, args=cpu_args(tmp_path), train_dataset=dataset, processing_class=tiny_tokenizer
        )


def sequence_logps(model, ids, attention_mask, completion_mask):
    """Summed completion log-probs from a plain forward (full logits, float64): independent of the trainer."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits.double()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize(
    "precompute,kl_pairing,kl_subset_size",
    [
        (False, "batch", None),
        (True, "batch", None),
        (True, "dataset", None),
        (False, "dataset", 2),
        (True, "batch", 3),
    ],
)
def test_loss_matches_independent_computation(
    small_model, tiny_tokenizer, tmp_path, precompute, kl_pairing, kl_subset_size
):
    from test_loss import reference_kto

    initial = copy.deepcopy(small_model)
    trainer = KTOExtTrainer(
        model=small_model,
        args=cpu_args(
            tmp_path,
            per_device_train_batch_size=6,
            precompute_ref_log_probs=precompute,
            kl_pairing=kl_pairing,
            kl_subset_size=kl_subset_size,
            beta=0.5,
        ),
        train_dataset=make_kto_dataset(30, seed=10, desirable_ratio=0.3),
        processing_class=tiny_tokenizer,
    )
    assert (trainer.ref_model is None) == (precompute and kl_pairing == "dataset")
    perturb_(trainer.model, scale=0.1, seed=1)  # the policy moves; the reference must not
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("ref_KL_logps" in batch) == (precompute and kl_pairing == "dataset")
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))

    k = kl_subset_size or batch["KL_input_ids"].size(0)
    kl = [batch[f"KL_{name}"][:k] for name in ("input_ids", "attention_mask", "completion_mask")]
    target = [batch[name] for name in ("input_ids", "attention_mask", "completion_mask")]
    lam_d = trainer.loss_aversion.desirable_weight
    expected, z0, _ = reference_kto(
        sequence_logps(trainer.model, *target).tolist(),
        sequence_logps(initial, *target).tolist(),
        sequence_logps(trainer.model, *kl).tolist(),
        sequence_logps(initial, *kl).tolist(),
        batch["label"].tolist(),
        0.5,
        lam_d,
        1.0,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(z0, rel=1e-4, abs=1e-5)
    assert trainer._metrics["train"]["kl_rows"][-1] == k


def test_dataset_pairing_never_pairs_a_prompt_with_itself(small_model, tiny_tokenizer, tmp_path):
    trainer = KTOExtTrainer(
        model=small_model,
        args=cpu_args(tmp_path, kl_pairing="dataset"),
        train_dataset=make_kto_dataset(200, seed=11),
        processing_class=tiny_tokenizer,
    )
    rows = trainer.train_dataset
    by_completion = {}
    for r in rows:
        by_completion.setdefault(tuple(r["completion_ids"]), set()).add(tuple(r["prompt_ids"]))
    for r in rows:
        owners = by_completion[tuple(r["KL_completion_ids"])]
        assert owners - {tuple(r["prompt_ids"])}, "the KL completion must be written for another prompt"


@pytest.mark.parametrize("from_path", [True, False])
def test_reference_copy_runs_its_own_weights(tiny_default, tmp_path, from_path):
    """With cached targets and per-batch KL pairs a reference copy is kept: it must stay at the initial weights even
    though TRL patches the policy's forward (a plain deep copy's unfused forward would keep calling the policy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_default.model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_default.model_dir)
    model = tiny_default.model_dir if from_path else AutoModelForCausalLM.from_pretrained(tiny_default.model_dir)
    if not from_path:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)  # as an earlier TRL trainer in the same session would have left it
    trainer = KTOExtTrainer(
        model=model,
        args=cpu_args(tmp_path, precompute_ref_log_probs=True, kl_pairing="batch", per_device_train_batch_size=6),
        train_dataset=make_kto_dataset(24, seed=12),
        processing_class=tokenizer,
    )
    assert trainer.ref_model is not None
    perturb_(trainer.model, scale=0.2, seed=3)
    batch = {k: v for k, v in next(iter(trainer.get_train_dataloader())).items()}
    kl = [batch[f"KL_{name}"] for name in ("input_ids", "attention_mask", "completion_mask")]
    expected = sequence_logps(base, *kl).float()
    assert torch.allclose(trainer._reference_kl_logps(batch).float(), expected, atol=1e-3)
    assert not torch.allclose(sequence_logps(trainer.model, *kl).float(), expected, atol=1e-3)
    # The plain forward (as `generate` uses it) of the reference runs the reference's weights too.
    assert torch.allclose(sequence_logps(trainer.ref_model, *kl).float(), expected, atol=1e-3)


@pytest.mark.parametrize("bf16", [None, False])
def test_bf16_turned_on_by_default_is_said_once(small_model, tiny_tokenizer, tmp_path, capsys, bf16):
    args = cpu_args(tmp_path, max_steps=1, bf16=bf16)
    assert args.bf16 is (bf16 is None)  # unset with use_cpu=True: on
    trainer = KTOExtTrainer(
        model=small_model, args=args, train_dataset=make_kto_dataset(8, seed=0), processing_class=tiny_tokenizer
    )
    trainer.train()
    out = capsys.readouterr().out
    assert out.count("bf16 left unset: training in bf16 mixed precision") == (1 if bf16 is None else 0)
    assert out.count("pass bf16=False for float32 (most CPUs only emulate bf16") == (1 if bf16 is None else 0)
