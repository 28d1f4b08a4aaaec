"""Labels are read by their meaning on every entry point: text markers and ClassLabel names, never ClassLabel codes;
paired data becomes interleaved unpaired rows by one conversion, in prepare_unpaired, the CLI and the trainer."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_args
from data_helpers import _hf_cache_in_tmp  # noqa: F401  (the fixture is autouse)
from datasets import ClassLabel, Dataset
from trl import KTOConfig

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.data.loading import load_unpaired_dataset, prepare_unpaired
from trl_kto_ext.loss_aversion import count_raw_labels

# (desirable marker, undesirable marker). Sorted by `class_encode_column`, the desirable name gets code 0 in the
# first three families: reading the codes as booleans would swap every label there.
FAMILIES = [
    ("desirable", "undesirable"),
    ("chosen", "rejected"),
    ("👍", "👎"),
    ("good", "bad"),
    ("true", "false"),
    ("yes", "no"),
    ("positive", "negative"),
    ("up", "down"),
]
MEANING = [True, False, True, True, False, True, False, False]  # 4 desirable, 4 undesirable, not alternating


def _class_label_rows(family) -> Dataset:
    good, bad = family
    rows = [
        {"prompt": f"{i}+1=", "completion": str(i + 1 if desirable else i + 2), "label": good if desirable else bad}
        for i, desirable in enumerate(MEANING)
    ]
    return Dataset.from_list(rows).class_encode_column("label")


def test_class_encoding_sorts_names_so_codes_carry_no_meaning():
    # The premise of this file: for "desirable"/"undesirable" the desirable rows get code 0.
    encoded = _class_label_rows(FAMILIES[0])
    assert encoded.features["label"].names == ["desirable", "undesirable"]
    assert encoded["label"][:2] == [0, 1]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[0])
def test_prepare_unpaired_reads_class_label_names(family):
    out = prepare_unpaired(_class_label_rows(family))
    assert out["label"] == MEANING
    assert out.column_names == ["prompt", "completion", "label"]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[0])
def test_save_to_disk_then_load_reads_class_label_names(tmp_path, family):
    _class_label_rows(family).save_to_disk(str(tmp_path / "saved"))
    assert load_unpaired_dataset(str(tmp_path / "saved"))["label"] == MEANING


@pytest.mark.parametrize("family", FAMILIES[:3], ids=lambda f: f[0])
def test_trainer_reads_class_label_names(small_model, tiny_tokenizer, tmp_path, family):
    dataset = _class_label_rows(family)
    dataset = dataset.select([0, 1, 2, 3, 4, 5, 6])  # 4 desirable, 3 undesirable: the counts show a swap
    assert count_raw_labels(dataset) == (4, 3)
    args = cpu_args(tmp_path, per_device_train_batch_size=7, train_sampling_strategy="sequential")
    trainer = KTOExtTrainer(model=small_model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    assert trainer.train_dataset["label"] == MEANING[:7]
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (4, 3)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["label"].tolist() == MEANING[:7]


@pytest.mark.parametrize("family", [("good", "bad"), ("👍", "👎"), ("Thumbs-Up", "thumbs_down"), (1, 0)], ids=str)
def test_trainer_reads_text_and_number_labels_by_meaning(small_model, tiny_tokenizer, tmp_path, family):
    """Labels the README lists ('good'/'bad', 👍/👎, 0/1) work in Python too, not only through the loader/CLI."""
    good, bad = family
    rows = [
        {"prompt": f"{i}+1=", "completion": str(i + 1 if desirable else i + 2), "label": good if desirable else bad}
        for i, desirable in enumerate(MEANING[:7])
    ]
    args = cpu_args(tmp_path, per_device_train_batch_size=7, train_sampling_strategy="sequential")
    trainer = KTOExtTrainer(
        model=small_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer
    )
    assert trainer.train_dataset["label"] == MEANING[:7]
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (4, 3)
    assert next(iter(trainer.get_train_dataloader()))["label"].tolist() == MEANING[:7]


def test_trainer_reads_class_label_names_in_eval_set(small_model, tiny_tokenizer, tmp_path):
    trainer = KTOExtTrainer(
        model=small_model,
        args=cpu_args(tmp_path),
        train_dataset=_class_label_rows(FAMILIES[0]),
        eval_dataset=_class_label_rows(FAMILIES[1]),
        processing_class=tiny_tokenizer,
    )
    assert trainer.eval_dataset["label"] == MEANING


UNKNOWN_NAMES = (
    "The 'label' column is a ClassLabel with names ['neg_x', 'pos_x']: ['neg_x', 'pos_x'] are not recognised, so which "
    "code is desirable is unknown. Name the classes with markers this package reads (desirable/undesirable, "
    "good/bad, chosen/rejected, true/false, ...), keeping their order, e.g. `dataset = dataset.cast_column('label', "
    "datasets.ClassLabel(names=['undesirable', 'desirable']))` if code 0 is the undesirable class, or convert the "
    "column to booleans yourself."
)


def _unknown_names() -> Dataset:
    rows = {"prompt": ["1+1=", "2+2="], "completion": ["2", "5"], "label": [1, 0]}
    return Dataset.from_dict(rows).cast_column("label", ClassLabel(names=["neg_x", "pos_x"]))


def test_unrecognised_class_names_are_an_error_everywhere(small_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError) as err:
        prepare_unpaired(_unknown_names())
    assert str(err.value) == UNKNOWN_NAMES
    with pytest.raises(ValueError) as err:
        count_raw_labels(_unknown_names())
    assert str(err.value) == UNKNOWN_NAMES
    with pytest.raises(ValueError) as err:
        KTOExtTrainer(model=small_model, args=cpu_args(tmp_path), train_dataset=_unknown_names(),
                      processing_class=tiny_tokenizer)  # fmt: skip
    assert str(err.value) == UNKNOWN_NAMES


def test_renamed_class_names_are_read():
    fixed = _unknown_names().cast_column("label", ClassLabel(names=["undesirable", "desirable"]))
    assert prepare_unpaired(fixed)["label"] == [True, False]


# ------------------------------------------------------------------------------------ paired data, interleaved
N_PAIRS = 40


def _text_pairs(n=N_PAIRS) -> Dataset:
    return Dataset.from_list([{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(n)])


def _conversation_pairs(n=N_PAIRS) -> Dataset:
    def chat(i, answer):
        return [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(answer)}]

    return Dataset.from_list([{"chosen": chat(i, i + 1), "rejected": chat(i, i + 2)} for i in range(n)])


def _sequential_args(tmp_path, plain_trl: bool):
    if plain_trl:  # TRL's own config: its sampler is sequential
        return KTOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
                         report_to="none", per_device_train_batch_size=8, per_device_eval_batch_size=8)  # fmt: skip
    return cpu_args(tmp_path, per_device_train_batch_size=8, train_sampling_strategy="sequential")


def _mixed_batches(labels_per_batch: list[list[bool]]) -> int:
    return sum(len(set(labels)) == 2 for labels in labels_per_batch)


@pytest.mark.parametrize("plain_trl", [True, False], ids=["trl.KTOConfig", "sequential"])
@pytest.mark.parametrize("make_pairs", [_text_pairs, _conversation_pairs], ids=["prompt-chosen-rejected", "chat"])
def test_pairs_given_to_the_trainer_are_interleaved(small_model, tiny_tokenizer, tmp_path, capsys, plain_trl,
                                                    make_pairs):  # fmt: skip
    trainer = KTOExtTrainer(model=small_model, args=_sequential_args(tmp_path, plain_trl),
                            train_dataset=make_pairs(), eval_dataset=make_pairs(16), processing_class=tiny_tokenizer)  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert "40 pairs -> 80 unpaired rows, interleaved" in printed
    assert "16 pairs -> 32 unpaired rows, interleaved" in printed
    assert type(trainer._get_train_sampler(trainer.train_dataset)).__name__ == "SequentialSampler"
    batches = [batch["label"].tolist() for batch in trainer.get_train_dataloader()]
    assert len(batches) == 10 and _mixed_batches(batches) == 10
    # Each pair's rows are side by side, chosen first, in the data's order.
    assert trainer.train_dataset["label"] == [True, False] * N_PAIRS
    assert trainer.eval_dataset["label"] == [True, False] * 16
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (40, 40)
    first = trainer.train_dataset[0]
    assert tiny_tokenizer.decode(first["completion_ids"]).startswith("1")  # pair 0's chosen answer, 0+1=1


def test_prepare_unpaired_and_cli_print_the_conversion(tmp_path, capsys):
    from trl_kto_ext.cli.offline import load_datasets, make_parser
    from trl_kto_ext.cli.parsing import parse_args

    out = prepare_unpaired(_text_pairs())
    assert capsys.readouterr().out.splitlines() == ["40 pairs -> 80 unpaired rows, interleaved"]
    assert out["label"] == [True, False] * N_PAIRS
    path = tmp_path / "pairs.jsonl"
    _text_pairs().to_json(str(path))
    script_args, training_args, _, _ = parse_args(["--dataset_name", str(path), "--output_dir", str(tmp_path),
                                                   "--eval_strategy", "no"], make_parser())  # fmt: skip
    train, _, _ = load_datasets(script_args, training_args)
    assert "40 pairs -> 80 unpaired rows, interleaved" in capsys.readouterr().out.splitlines()
    assert train["label"] == [True, False] * N_PAIRS
    labels = torch.tensor(train["label"]).view(-1, 8)
    assert int((labels.any(1) & ~labels.all(1)).sum()) == 10


def test_streams_are_converted_the_same_way(capsys):
    from trl_kto_ext.data.unpairing import as_unpaired

    rows = list(as_unpaired(_text_pairs(3).to_iterable_dataset()))
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("0+1=", "1", True), ("0+1=", "2", False), ("1+1=", "2", True), ("1+1=", "3", False), ("2+1=", "3", True),
        ("2+1=", "4", False),
    ]  # fmt: skip
    assert capsys.readouterr().out.splitlines() == ["paired stream -> unpaired rows (2 per pair), interleaved"]
    chats = list(as_unpaired(_conversation_pairs(2).to_iterable_dataset()))
    assert [r["prompt"] for r in chats] == [[{"role": "user", "content": "0+1="}]] * 2 + [
        [{"role": "user", "content": "1+1="}]
    ] * 2
    assert [r["completion"][0]["content"] for r in chats] == ["1", "2", "2", "3"]
    stream = as_unpaired(_class_label_rows(FAMILIES[0]).to_iterable_dataset())
    assert [r["label"] for r in stream] == MEANING


def test_subsample_class_reads_class_label_names():
    from trl_kto_ext.data.loading import subsample_class

    # Keep every desirable row and 1 of the 4 undesirable ones: the kept labels show which class was subsampled.
    kept = subsample_class(_class_label_rows(FAMILIES[0]), undesirable_fraction=0.25, seed=0)
    assert len(kept) == 5
    assert list(kept["label"]).count(0) == 4  # code 0 is "desirable" here
    assert prepare_unpaired(kept)["label"].count(True) == 4
