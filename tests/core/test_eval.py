"""Evaluation and prediction: reference log-probs come from the true reference on every path, and each pass reports
its own KTO metrics under its own prefix."""

import copy
import math

import pytest
import torch
from conftest import cpu_args
from peft import LoraConfig

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset

# Metrics that depend on time, not on the model.
_TIMING = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def kto_metrics(metrics):
    return {k: v for k, v in metrics.items() if not k.endswith(_TIMING) and k != "epoch"}


def build(model, tokenizer, tmp_path, eval_dataset, peft=False, by_path=False, **overrides):
    values = dict(max_steps=4, learning_rate=1e-3, per_device_eval_batch_size=4, disable_dropout=True)
    values.update(overrides)
    if by_path:  # as the CLI passes it: a reference not kept (every log-prob cached) is reloaded from the path
        model.save_pretrained(tmp_path / "model")
    return KTOExtTrainer(
        model=str(tmp_path / "model") if by_path else copy.deepcopy(model),
        args=cpu_args(tmp_path, **values),
        train_dataset=make_kto_dataset(16, seed=0),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        if peft
        else None,
    )


def every_entry_point(trainer):
    """Trains, then evaluates through each entry point; returns {entry point: metrics}."""
    trainer.train()
    held_out = make_kto_dataset(8, seed=11, split="heldout")
    other = make_kto_dataset(6, seed=12, split="heldout")
    return {
        "init": trainer.evaluate(),
        "later": trainer.evaluate(held_out),
        "predict": trainer.predict(held_out).metrics,
        "dict": trainer.evaluate({"a": held_out, "b": other}),
    }


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kl_pairing", ["batch", "dataset"])
def test_cached_reference_gives_the_same_eval_metrics(
    small_model, tiny_tokenizer, tmp_path, kl_pairing, peft, loss_type
):
    """With `precompute_ref_log_probs` every reference log-prob of every evaluation (set at init, given later,
    predict, a dict of sets) equals the one computed live from the reference model, after the policy has trained."""
    runs = {}
    for cached in (False, True):
        trainer = build(
            small_model,
            tiny_tokenizer,
            tmp_path / str(cached),
            make_kto_dataset(16, seed=10, split="heldout"),
            peft=peft,
            precompute_ref_log_probs=cached,
            kl_pairing=kl_pairing,
            loss_type=loss_type,
            by_path=not peft,
        )
        runs[cached] = {name: kto_metrics(m) for name, m in every_entry_point(trainer).items()}
    for name, live in runs[False].items():
        cached = runs[True][name]
        assert sorted(cached) == sorted(live), name
        for key, value in live.items():
            assert cached[key] == pytest.approx(value, abs=1e-5), (name, key)
    init = runs[True]["init"]
    if loss_type == "kto":
        assert init["eval_kl_raw"] != 0.0  # the symptom of a reference taken from the trained policy
        for name, prefix in (("later", "eval"), ("predict", "test"), ("dict", "eval_a"), ("dict", "eval_b")):
            assert math.isfinite(runs[True][name][f"{prefix}_kl_raw"]), (name, prefix)


def test_issue_case_eval_kl_is_the_reference_kl(small_model, tiny_tokenizer, tmp_path):
    """The reported case: full fine-tuning, cached reference, kl_pairing='dataset', 16-row eval set at init, 4 steps.
    The eval KL equals mean(log pi_theta - log pi_ref) over the eval KL rows, computed here with the initial model."""
    initial = copy.deepcopy(small_model).eval()
    trainer = build(
        small_model,
        tiny_tokenizer,
        tmp_path,
        make_kto_dataset(16, seed=10, split="heldout"),
        precompute_ref_log_probs=True,
        kl_pairing="dataset",
    )
    assert trainer.ref_model is None  # the reference is kept in host memory, off the device
    trainer.train()
    metrics = trainer.evaluate()
    # Independent reference: the same eval batches (a fresh collator copy pairs them as `evaluate` did), scored with
    # a plain forward of the trained policy and of the initial model.
    loader = trainer.get_eval_dataloader()
    ratios = []
    with torch.no_grad():
        for batch in loader:
            policy = _kl_logps(trainer.model, batch)
            reference = _kl_logps(initial, batch)
            ratios.append(policy - reference)
    ratios = [torch.cat(ratios)]
    per_batch = [r.mean().item() for r in _split(ratios[0], 4)]
    assert metrics["eval_kl_raw"] == pytest.approx(sum(per_batch) / len(per_batch), abs=1e-5)
    assert metrics["eval_kl_raw"] != 0.0


def _split(tensor, size):
    return [tensor[i : i + size] for i in range(0, tensor.numel(), size)]


def _kl_logps(model, batch):
    ids, mask, completion = batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    per_token = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (per_token * completion[:, 1:]).sum(-1)


def test_reference_is_kept_in_host_memory_and_not_on_the_policy(small_model, tiny_tokenizer, tmp_path):
    eval_dataset = make_kto_dataset(8, seed=10, split="heldout")  # its KL rows need the reference: a copy is kept
    trainer = build(
        small_model, tiny_tokenizer, tmp_path, eval_dataset, precompute_ref_log_probs=True, kl_pairing="dataset",
        max_steps=2,
    )  # fmt: skip
    trainer.train()
    kept = trainer._host_reference.model
    assert all(p.device.type == "cpu" for p in kept.parameters())
    for (name, p), (_, q) in zip(small_model.named_parameters(), kept.named_parameters()):
        assert torch.equal(p, q), name  # the initial weights, untouched by training
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), kept.parameters()))


# ------------------------------------------------------------------------------------------- metrics per pass
def class_counts(dataset):
    labels = list(dataset["label"])
    return sum(labels), len(labels) - sum(labels)


def test_each_pass_reports_its_own_counts_under_its_prefix(small_model, tiny_tokenizer, tmp_path):
    eval_set = make_kto_dataset(16, seed=10, split="heldout")  # 8 + 8
    test_set = make_kto_dataset(12, seed=13, desirable_ratio=0.25, split="heldout")  # 3 + 9
    trainer = build(small_model, tiny_tokenizer, tmp_path, eval_set, per_device_eval_batch_size=5)
    test = trainer.evaluate(test_set, metric_key_prefix="test")
    assert (test["test_count/desirable"], test["test_count/undesirable"]) == class_counts(test_set) == (3, 9)
    for key in ("test_kl_raw", "test_rewards/chosen", "test_lambda_D", "test_loss_aversion_ratio"):
        assert key in test and math.isfinite(test[key]), key
    assert not [k for k in test if not k.startswith("test_") and k != "epoch"]  # nothing unprefixed
    evaluation = trainer.evaluate()
    assert (evaluation["eval_count/desirable"], evaluation["eval_count/undesirable"]) == class_counts(eval_set)
    assert not [k for k in evaluation if not k.startswith("eval_") and k != "epoch"]
    # Evaluating again gives the same numbers: nothing is carried from one pass to the next.
    assert kto_metrics(trainer.evaluate()) == kto_metrics(evaluation)


def test_dict_of_eval_sets_gives_one_prefixed_set_of_metrics_each(small_model, tiny_tokenizer, tmp_path):
    sets = {
        "easy": make_kto_dataset(10, seed=14, desirable_ratio=0.3, split="heldout"),
        "hard": make_kto_dataset(8, seed=15, desirable_ratio=0.75, split="heldout"),
    }
    trainer = build(small_model, tiny_tokenizer, tmp_path, sets, max_steps=2, eval_strategy="steps", eval_steps=1)
    trainer.train()
    history = list(trainer.state.log_history)
    for name, dataset in sets.items():
        alone = kto_metrics(trainer.evaluate(dataset, metric_key_prefix=f"eval_{name}"))
        both = kto_metrics(trainer.evaluate())
        assert (both[f"eval_{name}_count/desirable"], both[f"eval_{name}_count/undesirable"]) == class_counts(dataset)
        for key, value in alone.items():
            assert both[key] == pytest.approx(value, abs=1e-6), key
    # The evaluations during training were logged under their prefixes, and training logs carry no eval counts.
    during = [h for h in history if "eval_easy_loss" in h]
    assert len(during) == 2 and all(h["eval_easy_count/desirable"] == 3 for h in during)
    assert all(h["eval_hard_count/undesirable"] == 2 for h in history if "eval_hard_loss" in h)
    train_logs = [h for h in history if "loss" in h]
    assert train_logs and all(h["count/desirable"] + h["count/undesirable"] == 4 for h in train_logs)
    assert all(not any(k.startswith("eval") for k in h) for h in train_logs)


def test_predict_returns_the_metrics_of_evaluate_with_the_test_prefix(small_model, tiny_tokenizer, tmp_path):
    test_set = make_kto_dataset(10, seed=16, split="heldout")
    trainer = build(small_model, tiny_tokenizer, tmp_path, None, max_steps=2)
    trainer.train()
    evaluated = kto_metrics(trainer.evaluate(test_set, metric_key_prefix="test"))
    output = trainer.predict(test_set)
    predicted = kto_metrics(output.metrics)
    assert sorted(predicted) == sorted(evaluated)
    for key, value in evaluated.items():
        assert predicted[key] == pytest.approx(value, abs=1e-6), key
    assert predicted["test_count/desirable"] + predicted["test_count/undesirable"] == 10
    assert output.predictions.shape[0] == 10  # one row of logits per example


def test_without_a_kept_reference_every_path_stops_with_a_clear_error(small_model, tiny_tokenizer, tmp_path):
    """Where no reference can be kept (DeepSpeed, FSDP, quantized: simulated here by dropping the kept copy), nothing
    falls back to the trained policy: eval KL rows, `predict` and `evaluate` on a new dataset all raise."""
    trainer = build(
        small_model,
        tiny_tokenizer,
        tmp_path,
        make_kto_dataset(8, seed=10, split="heldout"),
        precompute_ref_log_probs=True,
        kl_pairing="dataset",
        max_steps=1,
    )
    trainer._host_reference = None
    trainer.train()
    message = r"Cannot compute reference log-probs after training has started: `precompute_ref_log_probs=True`"
    with pytest.raises(RuntimeError, match=message):
        trainer.evaluate()  # the eval set's targets are cached, its KL rows are not
    with pytest.raises(RuntimeError, match=r"Cannot compute the reference log-probs of the 'test' dataset after"):
        trainer.predict(make_kto_dataset(6, seed=12, split="heldout"))
    with pytest.raises(ValueError, match=r"Cannot compute reference log-probs for a dataset passed to `evaluate\(\)`"):
        trainer.evaluate(make_kto_dataset(6, seed=12, split="heldout"))  # TRL's own check
