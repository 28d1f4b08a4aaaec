"""Bad input and bad steps: every case is reported with the problem and its fix, or skipped and counted, never trained
on silently. Each test asserts the message a user sees."""

import copy
import logging
import math

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from test_nonfinite import NaNFrom
from transformers import TrainerCallback

from trl_kto_ext import KTOExtCollator, KTOExtConfig, KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset
from trl_kto_ext.training.guards import NonFiniteLossError


def make_trainer(model, tokenizer, dataset, tmp_path, **overrides):
    return KTOExtTrainer(
        model=model, args=cpu_args(tmp_path, **overrides), train_dataset=dataset, processing_class=tokenizer
    )


def with_column(dataset, column, values):
    return Dataset.from_dict({**dataset.to_dict(), column: values})


def logged_steps(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_no_nan(entries):
    for entry in entries:
        for key, value in entry.items():
            assert not (isinstance(value, float) and not math.isfinite(value)), (key, entry)


# ------------------------------------------------------------------------------------------ columns and labels
@pytest.mark.parametrize("column", ["prompt", "completion", "label"])
def test_missing_column_names_it_and_the_fix(small_model, tiny_tokenizer, tmp_path, column):
    dataset = make_kto_dataset(8, seed=0).remove_columns(column)
    with pytest.raises(ValueError, match=rf"The train dataset has no '{column}' column \(columns present: ") as err:
        make_trainer(small_model, tiny_tokenizer, dataset, tmp_path)
    assert "rename_column" in str(err.value) and "prepare_unpaired" in str(err.value)


def test_paired_data_missing_rejected(small_model, tiny_tokenizer, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["1+1=", "2+2="], "chosen": ["2", "4"]})
    with pytest.raises(ValueError, match=r"The train dataset has no 'rejected' column"):
        make_trainer(small_model, tiny_tokenizer, dataset, tmp_path)


@pytest.mark.parametrize(
    "labels,message",
    [
        (["maybe"] * 8, r"label 'maybe' at row 0 \(counting from 0\) of the train dataset \(8 rows have a"),
        (
            [True, False, None, True, False, True, False, True],
            r"label None at row 2 \(counting from 0\) of",
        ),
        ([2] * 8, r"label 2 at row 0 \(counting from 0\) of the train dataset \(8 rows"),
    ],
)
def test_bad_labels_name_the_row_and_the_fix(small_model, tiny_tokenizer, tmp_path, labels, message):
    dataset = with_column(make_kto_dataset(8, seed=0), "label", labels)
    with pytest.raises(ValueError, match=message) as err:
        make_trainer(small_model, tiny_tokenizer, dataset, tmp_path)
    assert "Accepted labels: bools, 0/1" in str(err.value) and "'good'/'bad'" in str(err.value)


def test_bad_label_in_eval_dataset(small_model, tiny_tokenizer, tmp_path):
    eval_set = with_column(make_kto_dataset(4, seed=1), "label", ["good", "bad", "meh", "good"])
    with pytest.raises(ValueError, match=r"label 'meh' at row 2 \(counting from 0\) of the eval dataset\."):
        KTOExtTrainer(
            model=small_model,
            args=cpu_args(tmp_path),
            train_dataset=make_kto_dataset(8, seed=0),
            eval_dataset=eval_set,
            processing_class=tiny_tokenizer,
        )


# ------------------------------------------------------------------------------------------------- zero rows
def test_zero_rows(small_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"The train dataset has 0 rows: there is nothing to train on"):
        make_trainer(small_model, tiny_tokenizer, make_kto_dataset(8).select([]), tmp_path)
    with pytest.raises(ValueError, match=r"The eval dataset has 0 rows: there is nothing to evaluate on"):
        KTOExtTrainer(
            model=small_model,
            args=cpu_args(tmp_path),
            train_dataset=make_kto_dataset(8),
            eval_dataset=make_kto_dataset(8).select([]),
            processing_class=tiny_tokenizer,
        )


def test_zero_rows_after_max_length_filter(small_model, tiny_tokenizer, tmp_path):
    # Prompts "a+b=" are 5 to 7 tokens with BOS: a max_length of 4 leaves no completion token anywhere.
    with pytest.raises(ValueError, match=r"All 8 rows of the train dataset were dropped: each prompt alone has") as e:
        make_trainer(small_model, tiny_tokenizer, make_kto_dataset(8, seed=0), tmp_path, max_length=4)
    assert "max_length=4" in str(e.value) and "Raise `max_length`" in str(e.value)


# --------------------------------------------------------------------------------------- empty / malformed text
@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("column", ["prompt", "completion"])
def test_empty_prompt_or_completion_names_the_row(small_model, tiny_tokenizer, tmp_path, conversational, column):
    dataset = make_kto_dataset(8, seed=0, conversational=conversational)
    values = list(dataset[column])
    values[3] = [{"role": values[3][0]["role"], "content": "  "}] if conversational else "   "
    dataset = with_column(dataset, column, values)
    detail = r"no message has any content" if conversational else r"'   '"
    with pytest.raises(
        ValueError, match=rf"{column} at row 3 \(counting from 0\) of the train dataset is empty \({detail}\)"
    ) as err:
        make_trainer(small_model, tiny_tokenizer, dataset, tmp_path)
    assert "Fill in or drop such rows, e.g. `dataset = dataset.filter(lambda r: " in str(err.value)
    # the suggested filter runs, also on a missing (None) value, and leaves only rows with text
    keep = eval("lambda r: " + str(err.value).split("filter(lambda r: ", 1)[1].split(")`", 1)[0])
    if not conversational:
        values[5] = None
        dataset = with_column(dataset, column, values)
    assert len(dataset.filter(keep)) == len(dataset) - (1 if conversational else 2)


@pytest.mark.parametrize(
    "prompt,message",
    [
        (["1+1="], r"prompt at row 0 \(counting from 0\) of the train dataset is not a list of \{'role', 'content'\} messages: message 0 "
                   r"is '1\+1='"),
        ([{"content": "1+1="}], r"message 0 has no 'role'"),
        ([{"role": "user", "content": 7}], r"has a message 0 whose 'content' is a int, not text or a list of parts"),
    ],
)  # fmt: skip
def test_malformed_conversation(small_model, tiny_tokenizer, tmp_path, prompt, message):
    dataset = make_kto_dataset(4, seed=0, conversational=True)
    dataset = with_column(dataset, "prompt", [prompt] * 4)
    with pytest.raises(ValueError, match=message) as err:
        make_trainer(small_model, tiny_tokenizer, dataset, tmp_path)
    assert "Conversational rows must be lists of {'role': ..., 'content': ...} dicts" in str(err.value)


def test_message_without_content_or_fields_is_empty(small_model, tiny_tokenizer, tmp_path):
    # A message may lack 'content' (e.g. an assistant turn holding only tool calls); with nothing else it is empty.
    dataset = with_column(make_kto_dataset(4, seed=0, conversational=True), "prompt", [[{"role": "user"}]] * 4)
    with pytest.raises(
        ValueError,
        match=r"prompt at row 0 \(counting from 0\) of the train dataset is empty \(no message has any content",
    ):
        make_trainer(small_model, tiny_tokenizer, dataset, tmp_path)


def test_text_prompt_with_conversational_completion(small_model, tiny_tokenizer, tmp_path):
    conversational = make_kto_dataset(4, seed=0, conversational=True)
    dataset = with_column(conversational, "prompt", list(list(make_kto_dataset(4, seed=0)["prompt"])))
    with pytest.raises(ValueError, match=r"\['completion'\] hold lists of messages but \['prompt'\] hold plain text"):
        make_trainer(small_model, tiny_tokenizer, dataset, tmp_path)


def test_wrong_text_type(small_model, tiny_tokenizer, tmp_path):
    dataset = with_column(make_kto_dataset(4, seed=0), "completion", [1, 2, 3, 4])
    with pytest.raises(
        ValueError, match=r"completion at row 0 \(counting from 0\) of the train dataset is a int \('1'\), not text or"
    ):
        make_trainer(small_model, tiny_tokenizer, dataset, tmp_path)


def test_conversational_data_without_chat_template(small_model, tiny_tokenizer, tmp_path):
    tiny_tokenizer.chat_template = None
    dataset = make_kto_dataset(8, seed=0, conversational=True)
    with pytest.raises(ValueError, match=r"The train dataset is conversational .* the tokenizer has no chat template"):
        make_trainer(small_model, tiny_tokenizer, dataset, tmp_path)


# ------------------------------------------------------------------------------------------ max_length: logged
def test_dropped_and_truncated_rows_are_counted_in_the_log(small_model, tiny_tokenizer, tmp_path, caplog):
    # max_length=12. Short rows: BOS + "a+b=" (5 tokens) + answer + EOS. Rows 2 and 5 have a 14-token prompt
    # (dropped: nothing of the completion would remain); rows 1, 4 and 7 have a 12-digit answer (truncated).
    prompts = [f"{i}+{i}=" for i in range(8)]
    completions = [str(2 * i) for i in range(8)]
    for row in (2, 5):
        prompts[row] = f"{row}{row}{row}{row}{row}+{row}{row}{row}{row}{row}{row}{row}="
    for row in (1, 4, 7):
        completions[row] = "1" * 12
    dataset = Dataset.from_dict({"prompt": prompts, "completion": completions, "label": [True, False] * 4})
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.data.validation"):
        trainer = make_trainer(small_model, tiny_tokenizer, dataset, tmp_path, max_length=12, max_steps=1)
    text = caplog.text
    assert "train dataset: dropped 2 of 8 rows whose prompt alone has max_length=12 tokens or more" in text
    assert "(2 rows dropped: 2, 5)" in text
    assert "train dataset: truncated 3 of 8 rows longer than max_length=12 tokens" in text
    assert "TRL's truncation keeps the start" in text and "(3 rows truncated: 1, 4, 7)" in text
    assert len(trainer.train_dataset) == 6
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in logged_steps(trainer))


def test_loss_aversion_counts_only_the_rows_kept(small_model, tiny_tokenizer, tmp_path, caplog):
    """Two desirable rows whose prompt alone is longer than the model's 64 positions are dropped: lambda comes from
    the 2 desirable and 4 undesirable rows trained on, and the advice does not ask for a longer max_length."""
    prompts = [f"{i}+{i}=" for i in range(6)]
    prompts[0] = prompts[1] = "1" * 70 + "+1="
    labels = [True, True, True, True, False, False] + [False, False]
    prompts += ["7+7=", "8+8="]
    dataset = Dataset.from_dict({"prompt": prompts, "completion": ["2"] * 8, "label": labels})
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.data.validation"):
        trainer = make_trainer(small_model, tiny_tokenizer, dataset, tmp_path, max_steps=1)
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (2, 4)
    assert trainer.desirable_weight == pytest.approx(4 / 2) and trainer.undesirable_weight == pytest.approx(1.0)
    assert "train dataset: dropped 2 of 8 rows whose prompt alone has max_length=64 tokens or more" in caplog.text
    assert "longer than the model can take (max_position_embeddings 64)" in caplog.text
    assert "Raise `max_length`" not in caplog.text


# ------------------------------------------------------------------------------------------------- tokenizer
def test_missing_pad_token_uses_eos_with_a_warning(small_model, tiny_tokenizer, tmp_path):
    tiny_tokenizer.pad_token = None
    with pytest.warns(
        UserWarning, match=r"The tokenizer has no pad token; padding with its EOS token '</s>' \(id 2\)"
    ):
        trainer = make_trainer(small_model, tiny_tokenizer, make_kto_dataset(8, seed=0), tmp_path, max_steps=1)
    assert tiny_tokenizer.pad_token == tiny_tokenizer.eos_token
    assert trainer.data_collator.pad_token_id == tiny_tokenizer.eos_token_id
    trainer.train()
    assert math.isfinite(logged_steps(trainer)[0]["loss"])


@pytest.mark.parametrize("precompute,by_path", [(False, False), (True, False), (False, True)])
def test_vocabulary_mismatch_is_a_clear_error_before_training(
    small_model, tiny_tokenizer, tmp_path, precompute, by_path
):
    small_model.resize_token_embeddings(12)  # the digits start at id 7: most of them have no embedding row
    model = small_model
    if by_path:  # loaded by the trainer from its name, as the command line does
        small_model.save_pretrained(tmp_path / "model")
        model = str(tmp_path / "model")
    with pytest.raises(
        ValueError,
        match=r"Token id \d+ in the prompt of row 0 \(counting from 0\) of the train dataset is out of range",
    ) as e:
        make_trainer(model, tiny_tokenizer, make_kto_dataset(8), tmp_path, precompute_ref_log_probs=precompute)
    message = str(e.value)
    assert "input embedding has 12 rows (ids 0..11)" in message and f"{len(tiny_tokenizer)} tokens" in message
    assert "model.resize_token_embeddings(len(tokenizer))" in message


# ---------------------------------------------------------------------------------------- batches with no tokens
def test_batch_with_every_completion_truncated_is_skipped_and_counted(small_model, tiny_tokenizer, tmp_path, caplog):
    # A user collator truncating at 12 tokens; the second batch (sequential sampler) only has 14-token prompts.
    prompts = [f"{i}+{i}=" for i in range(12)]
    for row in range(4, 8):
        prompts[row] = f"{row}{row}{row}{row}{row}+{row}{row}{row}{row}{row}{row}{row}="
    dataset = Dataset.from_dict(
        {"prompt": prompts, "completion": [str(i) for i in range(12)], "label": [True, False] * 6}
    )
    collator = KTOExtCollator(pad_token_id=tiny_tokenizer.pad_token_id, max_length=12, seed=0)
    trainer = KTOExtTrainer(
        model=small_model,
        args=cpu_args(tmp_path, max_length=None, train_sampling_strategy="sequential"),
        data_collator=collator,
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.data.validation"):
        trainer.train()
    assert "Step 2: every completion token of the batch is masked" in caplog.text
    assert "counted in the `skipped/empty_batches` metric" in caplog.text
    first, second, third = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert second["skipped/empty_batches"] == 1 and second["grad_norm"] == 0.0
    assert "loss" not in second  # its 0 is no loss: not logged, and left out of train_loss
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx((first["loss"] + third["loss"]) / 2, rel=1e-6)
    assert "rewards/chosen" not in second and "kl" not in second  # no made-up metrics for an empty batch
    assert "skipped/empty_batches" not in first and "skipped/empty_batches" not in third
    assert first["loss"] > 0 and third["loss"] > 0
    assert_no_nan([first, second, third])


def test_compute_loss_on_a_fully_masked_batch_is_finite_with_zero_gradient(small_model, tiny_tokenizer, tmp_path):
    trainer = make_trainer(small_model, tiny_tokenizer, make_kto_dataset(8), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    batch["completion_mask"].zero_()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())
    assert trainer._metrics["train"]["skipped/empty_batches"] == [1]


# ------------------------------------------------------------------------------------------- non-finite loss


def test_nonfinite_loss_stops_with_the_step_and_likely_causes(small_model, tiny_tokenizer, tmp_path):
    trainer = make_trainer(small_model, tiny_tokenizer, make_kto_dataset(24), tmp_path, max_steps=4)
    trainer.add_callback(NaNFrom(trainer, steps=[3]))
    with pytest.raises(NonFiniteLossError, match=r"Non-finite training loss \(nan\) at step 3 \(epoch 0\.33\)") as e:
        trainer.train()
    message = str(e.value)
    assert "training stopped before this step's update" in message
    assert "The model's weights are still finite" in message
    assert "learning_rate=0.001" in message and "dtype: fp32" in message
    assert "set on_nonfinite_loss='skip'" in message
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_loss_skipped_with_zero_gradient_and_counted(small_model, tiny_tokenizer, tmp_path, caplog):
    trainer = make_trainer(
        small_model, tiny_tokenizer, make_kto_dataset(24), tmp_path, max_steps=4, on_nonfinite_loss="skip"
    )
    trainer.add_callback(NaNFrom(trainer, steps=[3]))
    with caplog.at_level(logging.WARNING, logger="trl_kto_ext.data.validation"):
        trainer.train()
    assert "Non-finite loss (nan) at step 3: skipped (zero gradient, counted in `skipped/nonfinite_steps`)" in (
        caplog.text
    )
    steps = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert [h.get("skipped/nonfinite_steps") for h in steps] == [None, None, 1, None]
    skipped = steps[2]
    # A skipped step has no loss value to log (not 0.0, which would look like perfect training).
    assert "loss" not in skipped and skipped["grad_norm"] == 0.0 and "kl" not in skipped
    assert_no_nan(steps)
    assert steps[3]["loss"] > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_overflowing_gradient_is_skipped_with_zero_gradient(small_model, tiny_tokenizer, tmp_path):
    """A finite loss whose gradient is infinite: clipping would turn it into NaN weights, so the step is skipped."""

    class InfiniteGradient(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == 2:
                weight = trainer.model.model.layers[0].mlp.down_proj.weight
                self.handle = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.handle.remove()

    trainer = make_trainer(
        small_model, tiny_tokenizer, make_kto_dataset(24), tmp_path, max_steps=3, on_nonfinite_loss="skip"
    )
    trainer.add_callback(InfiniteGradient())
    trainer.train()
    steps = logged_steps(trainer)
    assert [h.get("skipped/nonfinite_steps") for h in steps] == [None, 1, None]
    assert math.isfinite(steps[1]["loss"]) and steps[1]["grad_norm"] == 0.0
    assert_no_nan(steps)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_on_nonfinite_loss_must_be_raise_or_skip(tmp_path):
    with pytest.raises(ValueError, match=r"`on_nonfinite_loss` must be 'raise' or 'skip', got 'ignore'"):
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, on_nonfinite_loss="ignore")


def test_valid_data_still_trains(small_model, tiny_tokenizer, tmp_path):
    """The checks let good data through unchanged (text and conversational, train and eval)."""
    for conversational in (False, True):
        trainer = KTOExtTrainer(
            model=copy.deepcopy(small_model),
            args=cpu_args(tmp_path, max_steps=2),
            train_dataset=make_kto_dataset(16, seed=0, conversational=conversational),
            eval_dataset=make_kto_dataset(8, seed=1, conversational=conversational, split="heldout"),
            processing_class=tiny_tokenizer,
        )
        assert len(trainer.train_dataset) == 16
        trainer.train()
        assert_no_nan(trainer.state.log_history)
