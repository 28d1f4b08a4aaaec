"""`rewards/*`, `logps/*` and `rewards/margins` are means over the rows of a logging window or an evaluation pass,
not means of per-batch means: checked against a float64 forward pass of each row, on a policy held fixed (SGD with
learning rate 0) and a reference moved away from it, so every logged value has a known expected value."""

import copy
import json
import math

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset, IterableDataset

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset

BETA = 0.5


def labelled(labels, seed=0, split="train"):
    """Addition rows with the given labels, in that order (the label only sorts the rows into the two classes)."""
    rows = make_kto_dataset(len(labels), seed=seed, split=split).to_list()
    return Dataset.from_list([{**row, "label": label} for row, label in zip(rows, labels)])


def fixed_trainer(model, tokenizer, tmp_path, train, eval_dataset=None, **overrides):
    """A trainer whose policy never moves (SGD, lr 0) and whose reference is the policy perturbed (rewards != 0)."""
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    values = dict(train_sampling_strategy="sequential", loss_aversion="manual", beta=BETA, disable_dropout=True)
    values.update(overrides)
    return KTOExtTrainer(
        model=policy,
        ref_model=reference,
        args=cpu_args(tmp_path, **values),
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        optimizers=(torch.optim.SGD(policy.parameters(), lr=0.0), None),
    )


@torch.no_grad()
def row_logps64(model, rows):
    """log pi(y|x) of each tokenized row, summed over its completion tokens: one unpadded float64 forward per row."""
    model64 = copy.deepcopy(model).double().eval()
    out = []
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        per_token = model64(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append(per_token[len(row["prompt_ids"]) - 1 :].sum().item())
    return out


def per_row(trainer, dataset):
    """[(label, beta * r, log pi_theta)] of every row of a tokenized dataset, in float64."""
    rows = list(dataset)
    policy, reference = row_logps64(trainer.model, rows), row_logps64(trainer.ref_model, rows)
    return [(row["label"], BETA * (p - r), p) for row, p, r in zip(rows, policy, reference)]


def row_means(values):
    """The expected window metrics: plain means over the rows of each class."""
    chosen = [v for v in values if v[0]]
    rejected = [v for v in values if not v[0]]
    out = {"count/desirable": len(chosen), "count/undesirable": len(rejected)}
    if chosen:
        out["rewards/chosen"] = math.fsum(v[1] for v in chosen) / len(chosen)
        out["logps/chosen"] = math.fsum(v[2] for v in chosen) / len(chosen)
    if rejected:
        out["rewards/rejected"] = math.fsum(v[1] for v in rejected) / len(rejected)
        out["logps/rejected"] = math.fsum(v[2] for v in rejected) / len(rejected)
    if chosen and rejected:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def batch_mean_margin(values, size):
    """TRL's (and the earlier) value: the mean over batches holding both classes of each batch's margin."""
    margins = [row_means(values[i : i + size]).get("rewards/margins") for i in range(0, len(values), size)]
    margins = [m for m in margins if m is not None]
    return sum(margins) / len(margins)


def assert_window(logged, expected, prefix=""):
    for key, value in expected.items():
        assert logged[prefix + key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


def test_logging_window_of_four_steps_is_a_mean_over_its_twelve_rows(small_model, tiny_tokenizer, tmp_path):
    labels = [True, True, True, False, True, False, True, False, False, False, False, True]
    trainer = fixed_trainer(
        small_model, tiny_tokenizer, tmp_path, labelled(labels), per_device_train_batch_size=3, max_steps=4,
        logging_steps=4,
    )  # fmt: skip
    trainer.train()
    (window,) = [h for h in trainer.state.log_history if "loss" in h]
    values = per_row(trainer, trainer.train_dataset)  # the sequential sampler: steps 1-4 are rows 0-11
    expected = row_means(values)
    assert_window(window, expected)
    # The mean of the per-batch margins (batches 0-2, 3-5, ... of which the first holds one class) is another number.
    assert abs(batch_mean_margin(values, 3) - expected["rewards/margins"]) > 1e-2


def test_a_step_with_gradient_accumulation_is_a_mean_over_its_four_rows(small_model, tiny_tokenizer, tmp_path):
    labels = [True, False, True, True, False, False, True, False]
    trainer = fixed_trainer(
        small_model, tiny_tokenizer, tmp_path, labelled(labels, seed=1), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=2, logging_steps=1,
    )  # fmt: skip
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    values = per_row(trainer, trainer.train_dataset)
    for step, rows in zip(steps, (values[:4], values[4:])):
        assert_window(step, row_means(rows))
    # Step 1: micro-batches [T, F] and [T, T]; the per-batch mean keeps only the first one's margin.
    assert abs(batch_mean_margin(values[:4], 2) - row_means(values[:4])["rewards/margins"]) > 1e-2


def test_evaluation_in_batches_of_five_is_a_mean_over_the_pass(small_model, tiny_tokenizer, tmp_path):
    labels = [True, True, True, True, False, False, True, False, False, False, True, False]
    eval_set = labelled(labels, seed=2, split="heldout")
    trainer = fixed_trainer(
        small_model, tiny_tokenizer, tmp_path, labelled([True, False] * 4), eval_set, per_device_eval_batch_size=5
    )
    metrics = trainer.evaluate()
    values = per_row(trainer, trainer.eval_dataset)
    assert_window(metrics, row_means(values), prefix="eval_")
    assert abs(batch_mean_margin(values, 5) - row_means(values)["rewards/margins"]) > 1e-2
    again = trainer.evaluate()  # nothing carried over from one pass to the next
    assert {k: again[k] for k in metrics if "/" in k} == pytest.approx({k: v for k, v in metrics.items() if "/" in k})


def test_margin_of_an_eval_set_sorted_by_label_selects_the_best_model(small_model, tiny_tokenizer, tmp_path):
    """8 desirable then 8 undesirable rows in eval batches of 4: no batch holds both labels, the pass does."""
    eval_set = labelled([True] * 8 + [False] * 8, seed=4, split="heldout")
    trainer = fixed_trainer(
        small_model, tiny_tokenizer, tmp_path, labelled([True, False] * 4), eval_set,
        per_device_eval_batch_size=4, max_steps=2, eval_strategy="steps", eval_steps=1, save_strategy="steps",
        save_steps=1, metric_for_best_model="rewards/margins", load_best_model_at_end=True,
    )  # fmt: skip
    trainer.train()
    expected = row_means(per_row(trainer, trainer.eval_dataset))
    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evaluations) == 2
    for entry in evaluations:
        assert_window(entry, expected, prefix="eval_")
    assert trainer.state.best_metric == pytest.approx(expected["rewards/margins"], rel=1e-4, abs=1e-4)
    assert trainer.state.best_model_checkpoint is not None


def test_a_pass_over_one_class_reports_that_class_and_no_margin(small_model, tiny_tokenizer, tmp_path):
    eval_set = labelled([False] * 6, seed=5, split="heldout")
    trainer = fixed_trainer(small_model, tiny_tokenizer, tmp_path, labelled([True, False] * 4), eval_set)
    metrics = trainer.evaluate()
    assert_window(metrics, row_means(per_row(trainer, trainer.eval_dataset)), prefix="eval_")
    assert not any(key.endswith(("/chosen", "/margins")) for key in metrics)
    assert all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("metric", ["rewards/margins", "eval_rewards/chosen"])
def test_best_metric_that_a_one_class_eval_set_cannot_report_is_refused_at_start(
    small_model, tiny_tokenizer, tmp_path, metric
):
    eval_set = labelled([False] * 6, seed=5, split="heldout")
    with pytest.raises(ValueError) as info:
        fixed_trainer(
            small_model, tiny_tokenizer, tmp_path, labelled([True, False] * 4), eval_set, eval_strategy="steps",
            eval_steps=1, metric_for_best_model=metric,
        )  # fmt: skip
    name = metric.removeprefix("eval_")
    assert str(info.value) == (
        f"metric_for_best_model='eval_{name}' is undefined here: the eval set has no desirable rows (0 desirable, 6 "
        f"undesirable), so it reports no '{name}'. Give an eval set with both labels, or pick a metric it has (e.g. "
        "'loss', or 'rewards/rejected' with greater_is_better=False)."
    )


def test_best_metric_missing_from_a_streamed_one_class_eval_pass_is_a_clear_error(
    small_model, tiny_tokenizer, tmp_path
):
    eval_set = labelled([True] * 6, seed=6, split="heldout").to_iterable_dataset()
    assert isinstance(eval_set, IterableDataset)  # not counted at start: the pass finds it
    trainer = fixed_trainer(
        small_model, tiny_tokenizer, tmp_path, labelled([True, False] * 4), {"stream": eval_set},
        eval_strategy="steps", eval_steps=1, max_steps=1, metric_for_best_model="stream_rewards/margins",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"'eval_stream_rewards/margins' is undefined here: this evaluation pass has"):
        trainer.train()


def test_num_tokens_of_a_checkpoint_saved_between_two_logs(small_model, tiny_tokenizer, tmp_path):
    trainer = fixed_trainer(
        small_model, tiny_tokenizer, tmp_path, labelled([True, False] * 4), per_device_train_batch_size=2,
        max_steps=4, logging_steps=4, save_strategy="steps", save_steps=2,
    )  # fmt: skip
    trainer.train()
    lengths = [len(row["prompt_ids"]) + len(row["completion_ids"]) for row in trainer.train_dataset]
    state = json.loads((tmp_path / "checkpoint-2" / "kl_pairing_state.json").read_text())
    assert state["num_tokens"] == sum(lengths[:4])  # steps 1-2, not logged yet when the checkpoint was saved
    (window,) = [h for h in trainer.state.log_history if "loss" in h]
    assert window["num_tokens"] == sum(lengths)
