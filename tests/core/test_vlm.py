"""Vision-language models: a tiny random Qwen2.5-VL trains on image rows, multi-image rows and text-only rows, with
KL rows that pair each prompt with another prompt's completion."""

import math

import pytest
from conftest import cpu_args
from datasets import Dataset
from test_streaming import RecordingTrainer
from vlm_helpers import build_vlm, build_vlm_processor, image

from trl_kto_ext.vision import KTOExtVisionCollator


@pytest.fixture(scope="module")
def processor():
    return build_vlm_processor()


def _rows(n=12, images_per_row=1, shared=2):
    """n rows; every `shared` consecutive rows share one prompt (text and images) and differ in completion."""
    rows = []
    for i in range(n):
        group = i // shared
        content = [{"type": "image"}] * images_per_row + [{"type": "text", "text": f"What is shown {group}?"}]
        rows.append(
            {
                "images": [image(10 * group + k) for k in range(images_per_row)],
                "prompt": [{"role": "user", "content": content}],
                "completion": [{"role": "assistant", "content": f"Thing {i}."}],
                "label": i % 3 != 0,
            }
        )
    return rows


def _trainer(processor, rows, tmp_path, **overrides):
    values = dict(max_steps=2, max_length=None)
    values.update(overrides)
    trainer = RecordingTrainer(
        build_vlm(processor), args=cpu_args(tmp_path, **values), train_dataset=Dataset.from_list(rows),
        processing_class=processor,
    )  # fmt: skip
    trainer.batches = []
    return trainer


def _decoded_rows(processor, batch, prefix=""):
    """[(prompt text, completion text)] of the rows of a collated batch (padding left out)."""
    out = []
    ids, attn, comp = (batch[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "completion_mask"))
    for row_ids, row_attn, row_comp in zip(ids.tolist(), attn.tolist(), comp.tolist()):
        prompt = [t for t, a, c in zip(row_ids, row_attn, row_comp) if a and not c]
        completion = [t for t, a, c in zip(row_ids, row_attn, row_comp) if a and c]
        out.append((processor.tokenizer.decode(prompt), processor.tokenizer.decode(completion)))
    return out


def _assert_kl_rows_pair_other_prompts(processor, batches, n_rows, shared):
    """Each KL row: its target's prompt + the completion of a row of another prompt group (`Thing i.` is row i)."""
    seen = 0
    for batch in batches:
        targets = _decoded_rows(processor, batch)
        kl_rows = _decoded_rows(processor, batch, "KL_")
        for (prompt, completion), (kl_prompt, kl_completion) in zip(targets, kl_rows, strict=True):
            row = int(completion.split("Thing ")[1].split(".")[0])
            kl_row = int(kl_completion.split("Thing ")[1].split(".")[0])
            assert kl_prompt == prompt
            assert 0 <= kl_row < n_rows and kl_row // shared != row // shared
            seen += 1
    return seen


def _kl_raw(trainer):
    return [h["kl_raw"] for h in trainer.state.log_history if "kl_raw" in h]


@pytest.mark.parametrize("images_per_row", [1, 2])
def test_vlm_trains_with_kl_rows_from_other_prompts(processor, tmp_path, images_per_row):
    trainer = _trainer(processor, _rows(images_per_row=images_per_row), tmp_path)
    trainer.train()
    assert trainer.state.global_step == 2
    kl_raw = _kl_raw(trainer)
    assert len(kl_raw) == 2 and all(math.isfinite(v) for v in kl_raw)
    assert "pixel_values" in trainer.batches[0] and "KL_mm_token_type_ids" in trainer.batches[0]
    # Image tokens are in the prompts: images_per_row * 4 placeholders (56 x 56 pixels, 14-pixel patches merged 2x2).
    first = trainer.batches[0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((first["input_ids"] == image_id).sum(-1) == 4 * images_per_row).all()
    assert ((first["KL_input_ids"] == image_id).sum(-1) == 4 * images_per_row).all()
    assert _assert_kl_rows_pair_other_prompts(processor, trainer.batches, 12, shared=2) == 8


def test_vlm_batch_of_one_pairs_with_earlier_rows(processor, tmp_path):
    trainer = _trainer(processor, _rows(), tmp_path, per_device_train_batch_size=1, max_steps=3)
    trainer.train()
    assert all(math.isfinite(v) for v in _kl_raw(trainer)) and len(_kl_raw(trainer)) == 3
    assert _assert_kl_rows_pair_other_prompts(processor, trainer.batches, 12, shared=2) == 3


def test_vlm_auto_loss_aversion_counts_the_vision_rows(processor, tmp_path):
    rows = _rows()
    trainer = _trainer(processor, rows, tmp_path)
    n_d = sum(r["label"] for r in rows)
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (n_d, 12 - n_d)
    assert trainer.desirable_weight == pytest.approx((12 - n_d) / n_d)


def test_text_only_rows_for_a_vlm(processor, tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {i // 2}?"}],
            "completion": [{"role": "assistant", "content": f"Thing {i}."}],
            "label": i % 3 != 0,
        }
        for i in range(12)
    ]
    trainer = _trainer(processor, rows, tmp_path)
    trainer.train()
    kl_raw = _kl_raw(trainer)
    assert len(kl_raw) == 2 and all(math.isfinite(v) for v in kl_raw)
    assert "pixel_values" not in trainer.batches[0]
    assert _assert_kl_rows_pair_other_prompts(processor, trainer.batches, 12, shared=2) == 8


def test_vlm_apo_zero_unpaired_trains_without_kl_rows(processor, tmp_path):
    trainer = _trainer(processor, _rows(), tmp_path, loss_type="apo_zero_unpaired")
    trainer.train()
    assert trainer.state.global_step == 2
    assert not any(key.startswith("KL_") for key in trainer.batches[0])
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_vision_collator_never_pairs_a_prompt_with_itself(processor):
    # Two rows of one prompt and one of another: TRL's rotation pairs row 1 with row 0's completion (same prompt).
    rows = _rows(3, shared=2)
    collator = KTOExtVisionCollator(processor=processor, seed=0)
    for _ in range(20):
        batch = collator([dict(r) for r in rows])
        _assert_kl_rows_pair_other_prompts(processor, [batch], 3, shared=2)


def test_vision_rows_refuse_dataset_pairing_and_kl_subsets(processor, tmp_path):
    with pytest.raises(ValueError, match="kl_pairing='dataset' needs a tokenized training set"):
        _trainer(processor, _rows(), tmp_path, kl_pairing="dataset")
    trainer = _trainer(processor, _rows(), tmp_path, kl_subset_size=2)
    with pytest.raises(ValueError, match="kl_subset_size is not supported with image inputs"):
        trainer.train()


def test_mixed_image_and_text_only_rows(processor, tmp_path):
    rows = _rows()
    for i, row in enumerate(rows):
        if (i // 2) % 2:  # every other prompt group has no image
            row["images"] = []
            row["prompt"][0]["content"] = [part for part in row["prompt"][0]["content"] if part["type"] != "image"]
    trainer = _trainer(processor, rows, tmp_path, max_steps=3)
    trainer.train()
    kl_raw = _kl_raw(trainer)
    assert len(kl_raw) == 3 and all(math.isfinite(v) for v in kl_raw)
    assert _assert_kl_rows_pair_other_prompts(processor, trainer.batches, 12, shared=2) == 12


def test_vlm_eval_with_batch_of_one_pairs_within_the_eval_set(processor, tmp_path):
    trainer = _trainer(processor, _rows(), tmp_path, per_device_eval_batch_size=1)
    eval_rows = _rows(4, shared=1)
    metrics = trainer.evaluate(Dataset.from_list(eval_rows))
    assert math.isfinite(metrics["eval_kl_raw"]) and len(trainer.batches) == 4
    assert _assert_kl_rows_pair_other_prompts(processor, trainer.batches, 4, shared=1) == 4


def test_vision_rows_with_a_length_aware_sampler(processor, tmp_path):
    # Vision rows are tokenized only when collated: without a length column the trainer stops at once, and with
    # one it trains grouped by those lengths.
    with pytest.raises(ValueError, match="train_sampling_strategy='group_by_length' needs each row's length"):
        _trainer(processor, _rows(), tmp_path, train_sampling_strategy="group_by_length")
    rows = [dict(row, length=i) for i, row in enumerate(_rows())]
    trainer = _trainer(processor, rows, tmp_path, train_sampling_strategy="group_by_length")
    trainer.train()
    assert trainer.state.global_step == 2
    # Mega-batches of 4 rows (12 // (4 * 4) rounds up to 1 batch) sorted by the given length, the row index, longest
    # first; the overall longest row is swapped into the first place.
    for n, batch in enumerate(trainer.batches):
        order = [int(c.split("Thing ")[1].split(".")[0]) for _, c in _decoded_rows(processor, batch)]
        order = order[1:] if n == 0 else order
        assert order == sorted(order, reverse=True)


def test_streamed_vision_rows_with_batch_of_one(processor, tmp_path):
    rows = _rows()
    trainer = RecordingTrainer(
        build_vlm(processor),
        args=cpu_args(tmp_path, max_steps=3, per_device_train_batch_size=1, max_length=None),
        train_dataset=Dataset.from_list(rows).to_iterable_dataset(),
        processing_class=processor,
    )
    trainer.batches = []
    n_d = sum(r["label"] for r in rows)
    assert trainer.loss_aversion.counted_from == "all 12 rows of the stream"
    assert trainer.desirable_weight == pytest.approx((12 - n_d) / n_d)
    trainer.train()
    assert all(math.isfinite(v) for v in _kl_raw(trainer)) and len(_kl_raw(trainer)) == 3
    assert _assert_kl_rows_pair_other_prompts(processor, trainer.batches, 12, shared=2) == 3


def test_vision_class_label_is_read_by_its_names(processor, tmp_path):
    from datasets import ClassLabel

    rows = [dict(r, label="desirable" if r["label"] else "undesirable") for r in _rows()]
    dataset = Dataset.from_list(rows).cast_column("label", ClassLabel(names=["desirable", "undesirable"]))
    assert dataset[0]["label"] == 1  # row 0 is undesirable: code 1 by the sorted names
    trainer = RecordingTrainer(
        build_vlm(processor), args=cpu_args(tmp_path, max_steps=1, max_length=None, train_sampling_strategy="sequential"),
        train_dataset=dataset, processing_class=processor,
    )  # fmt: skip
    trainer.batches = []
    n_d = sum(r["label"] == "desirable" for r in rows)
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (n_d, 12 - n_d)
    trainer.train()
    assert trainer.batches[0]["label"].tolist() == [r["label"] == "desirable" for r in rows[:4]]


def test_vision_class_label_of_a_dataset_given_to_evaluate_is_read_by_its_names(processor, tmp_path):
    from datasets import ClassLabel

    trainer = _trainer(processor, _rows(), tmp_path, per_device_eval_batch_size=4)
    rows = [dict(r, label="desirable" if r["label"] else "undesirable") for r in _rows(8, shared=1)]
    encoded = Dataset.from_list(rows).cast_column("label", ClassLabel(names=["desirable", "undesirable"]))
    n_d = sum(r["label"] == "desirable" for r in rows)
    metrics = trainer.evaluate(encoded, metric_key_prefix="test")
    assert (metrics["test_count/desirable"], metrics["test_count/undesirable"]) == (n_d, 8 - n_d)
    predicted = trainer.predict(encoded).metrics
    assert (predicted["test_count/desirable"], predicted["test_count/undesirable"]) == (n_d, 8 - n_d)
