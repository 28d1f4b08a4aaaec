"""Scores to labels offline: the rule shared with online KTO, the dataset conversion, the loader, the trainer, the
command line."""

import json
import math
from types import SimpleNamespace

import pytest
from conftest import cpu_args
from datasets import Dataset

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.__main__ import main
from trl_kto_ext.data.loading import prepare_unpaired
from trl_kto_ext.data.scores import check_scores, label_scores, labels_from_scores, score_distances
from trl_kto_ext.models.tiny import make_kto_dataset
from trl_kto_ext.online.rewards import label_rewards


def settings(mode="threshold", threshold=0.5, weighting="none"):
    return SimpleNamespace(label_mode=mode, desirable_threshold=threshold, score_weighting=weighting)


def relative_by_hand(scores, groups):
    """Desirable iff score > its group's mean (Python float division of an exact sum); None for all-equal groups."""
    out = []
    for s, g in zip(scores, groups):
        members = [x for x, h in zip(scores, groups) if h == g]
        out.append(None if len(set(members)) == 1 else s > math.fsum(members) / len(members))
    return out


def test_threshold_labels_ties_are_desirable():
    assert label_scores([0.49, 0.5, 0.51, -3.0, 7.0], mode="threshold", threshold=0.5) == [
        False,
        True,
        True,
        False,
        True,
    ]


def test_relative_labels_compare_with_the_prompts_own_mean_ties_undesirable_equal_groups_left_out():
    scores = [1.0, 2.0, 3.0, 5.0, 5.0, 0.25, 0.75, 0.5, 4.0]
    groups = ["a", "a", "a", "b", "b", "c", "c", "c", "d"]  # b: all equal; d: a single completion
    expected = [False, False, True, None, None, False, True, False, None]  # 2.0 and 0.5 equal their mean: ties
    assert label_scores(scores, groups, mode="relative") == expected == relative_by_hand(scores, groups)


def test_groups_need_not_be_adjacent():
    scores, groups = [1.0, 9.0, 3.0, 0.0], ["x", "y", "x", "y"]
    assert label_scores(scores, groups, mode="relative") == [False, True, True, False]


def test_online_labels_are_the_same_rule():
    rewards = [0.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.75]
    for mode in ("threshold", "relative"):
        assert label_rewards(rewards, 2, mode, 0.5) == label_scores(rewards, [i // 2 for i in range(8)], mode, 0.5)


def test_distances_from_the_threshold_and_from_the_prompt_mean():
    assert score_distances([0.0, 0.75, 2.0], mode="threshold", threshold=0.5) == [0.5, 0.25, 1.5]
    assert score_distances([1.0, 2.0, 6.0, 4.0], ["a", "a", "a", "b"], mode="relative") == [2.0, 1.0, 3.0, 0.0]


def scored_rows():
    prompts = ["p1", "p1", "p1", "p2", "p2", "p3"]
    return Dataset.from_dict({"prompt": prompts, "completion": ["a", "b", "c", "d", "e", "f"],
                              "score": [0.0, 1.0, 2.0, 0.5, 0.5, 0.9]})  # fmt: skip


def test_dataset_threshold_labels_count_line_and_distance_weights():
    lines = []
    out = labels_from_scores(scored_rows(), settings("threshold", 0.75, "distance"), "train", report=lines.append)
    assert out["label"] == [False, True, True, False, False, True]
    assert out["weight"] == pytest.approx([0.75, 0.25, 1.25, 0.25, 0.25, 0.15])
    assert lines == [
        "train dataset: labels from the `score` column (label_mode='threshold', desirable_threshold=0.75): 3 "
        "desirable, 3 undesirable, 0 left out, each row weighted by its distance from the threshold."
    ]


def test_dataset_relative_labels_drop_rows_without_preference_and_multiply_weights():
    data = scored_rows().add_column("weight", [2.0, 1.0, 1.0, 1.0, 1.0, 3.0])
    lines = []
    out = labels_from_scores(data, settings("relative", weighting="distance"), "train", report=lines.append)
    assert out["completion"] == ["a", "b", "c"]  # p2 (equal scores) and p3 (one completion) left out
    assert out["label"] == [False, False, True]  # 1.0 is p1's mean: a tie
    assert out["weight"] == [2.0, 0.0, 1.0]  # |score - mean| times the row's own weight
    assert "1 desirable, 2 undesirable, 3 left out (prompts whose completions all have the same score)" in lines[0]


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_an_unusable_score_is_refused_naming_the_row(bad):
    data = Dataset.from_dict({"prompt": ["p"] * 3, "completion": ["a", "b", "c"], "score": [0.0, bad, 2.0]})
    with pytest.raises(ValueError, match=r"score at row 1 \(counting from 0\) of the train dataset is"):
        labels_from_scores(data, settings(), "train", report=print)
    with pytest.raises(ValueError, match=r"score at row 2 \(counting from 0\) of the eval dataset is 'high'"):
        check_scores([1.0, 2.0, "high"], "eval")


def test_relative_labels_with_no_preference_anywhere_are_refused():
    data = Dataset.from_dict({"prompt": ["p", "p", "q"], "completion": ["a", "b", "c"], "score": [1.0, 1.0, 2.0]})
    with pytest.raises(ValueError, match="Every row of the train dataset was left out"):
        labels_from_scores(data, settings("relative"), "train", report=print)


def test_stream_threshold_lazily_relative_refused():
    stream = scored_rows().to_iterable_dataset()
    rows = list(labels_from_scores(stream, settings("threshold", 0.5), "train", report=lambda _: None))
    assert [r["label"] for r in rows] == [False, True, True, True, True, True]
    with pytest.raises(ValueError, match="streamed train dataset"):
        labels_from_scores(stream, settings("relative"), "train")


def test_loader_maps_score_and_weight_columns_and_names_a_missing_one():
    raw = Dataset.from_dict(
        {"q": ["x", "y", "x"], "a": ["1", "2", "3"], "rating": [1.0, 4.0, 3.0], "w": [1.0, 2.0, 0.5]}
    )
    out = prepare_unpaired(raw, prompt_column="q", completion_column="a", score_column="rating", weight_column="w",
                           scores=settings("threshold", 3.0))  # fmt: skip
    assert out["label"] == [False, True, True] and out["weight"] == [1.0, 2.0, 0.5]
    with pytest.raises(ValueError, match=r"Column 'wt' \(weight_column\) is not in the data"):
        prepare_unpaired(raw, prompt_column="q", completion_column="a", score_column="rating", weight_column="wt")


def test_trainer_labels_a_score_column_and_the_card_says_how(tmp_path, small_model, tiny_tokenizer, capsys):
    data = make_kto_dataset(16, seed=2).remove_columns("label")
    data = data.add_column("score", [float(i % 5) for i in range(16)])
    args = cpu_args(tmp_path, max_steps=1, label_mode="threshold", desirable_threshold=2.0)
    trainer = KTOExtTrainer(model=small_model, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    printed = capsys.readouterr().out
    assert (
        "labels from the `score` column (label_mode='threshold', desirable_threshold=2): 9 desirable, 7 undesirable"
        in printed
    )
    assert (trainer.loss_aversion.n_desirable, trainer.loss_aversion.n_undesirable) == (9, 7)
    trainer.train()
    assert (
        "Labels from the `score` column: `label_mode='threshold'`, desirable_threshold = 2"
        in open(trainer.create_model_card()).read()
    )


def test_config_refuses_unknown_score_settings(tmp_path):
    with pytest.raises(ValueError, match="`label_mode` must be one of 'threshold', 'relative'"):
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, label_mode="median")
    with pytest.raises(ValueError, match="`score_weighting` must be one of 'none', 'distance'"):
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, score_weighting="squared")


def test_command_line_weight_and_score_columns(tiny_default, tmp_path, capsys):
    rows = [{"question": f"{a % 8}+1=", "answer": str(a + 1 + a % 2), "rating": float(a % 5), "w": 0.5 + a % 3}
            for a in range(40)]  # fmt: skip
    data = tmp_path / "scored.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["--model_name_or_path", str(tiny_default.model_dir), "--dataset_name", str(data), "--use_cpu", "true",
            "--prompt_column", "question", "--completion_column", "answer", "--score_column", "rating",
            "--weight_column", "w", "--label_mode", "relative", "--eval_strategy", "no", "--max_steps", "2",
            "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "labels from the `score` column (label_mode='relative')" in printed
    assert "weighted class mass" in printed
    card = (tmp_path / "run" / "README.md").read_text()
    assert "label_mode='relative'" in card and "weighted class mass" in card


def test_online_config_refuses_offline_only_settings(tmp_path):
    from trl_kto_ext import OnlineKTOConfig

    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, num_generations=4)
    with pytest.raises(ValueError, match="score_weighting and truncation_mode apply to offline datasets"):
        OnlineKTOConfig(**base, score_weighting="distance")
    with pytest.raises(ValueError, match="score_weighting and truncation_mode apply to offline datasets"):
        OnlineKTOConfig(**base, truncation_mode="keep_end")


def test_a_threshold_outside_the_scores_is_refused_not_one_class(tmp_path):
    """Ratings 2-5 with the default threshold 0.5 would make every row desirable without a word: refused, naming
    the range and the fix."""
    from datasets import Dataset

    from trl_kto_ext import KTOExtConfig
    from trl_kto_ext.data.scores import labels_from_scores

    data = Dataset.from_dict(
        {"prompt": ["a", "b", "c", "d"], "completion": ["1", "2", "3", "4"], "score": [2, 3, 4, 5]}
    )
    args = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True)
    with pytest.raises(ValueError, match=r"from 2 to 5\) is at or above desirable_threshold=0.5, so every row would be "
                       r"desirable: set desirable_threshold inside the scores' range"):  # fmt: skip
        labels_from_scores(data, args)
    args = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, desirable_threshold=4)
    assert labels_from_scores(data, args, report=lambda _: None)["label"] == [False, False, True, True]


def test_score_settings_on_labelled_data_are_refused_not_ignored(tmp_path):
    from datasets import Dataset

    from trl_kto_ext import KTOExtConfig
    from trl_kto_ext.data.scores import labels_from_scores

    data = Dataset.from_dict({"prompt": ["a", "b"], "completion": ["1", "2"], "label": [True, False]})
    args = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, desirable_threshold=3.0)
    with pytest.raises(ValueError, match=r"desirable_threshold=3.0: score settings.* has no scores .* ignored"):
        labels_from_scores(data, args)
    assert labels_from_scores(data, KTOExtConfig(output_dir=str(tmp_path), use_cpu=True)) is data
