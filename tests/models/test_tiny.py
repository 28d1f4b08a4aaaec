"""Tests of the embedded tiny default: tokenizer, data splits, preference datasets, base model and on-disk cache."""

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_kto_ext.models import tiny
from trl_kto_ext.models.tiny import (
    build_model,
    build_tiny_default,
    build_tokenizer,
    greedy_accuracy,
    heldout_prompts,
    is_correct,
    make_kto_dataset,
    make_paired_dataset,
    pretraining_corpus,
)

PROMPT_RE = re.compile(r"^(\d+)\+(\d+)=$")


def _sum(prompt: str) -> int:
    """The right answer, recomputed here rather than trusted from the module."""
    match = PROMPT_RE.match(prompt)
    assert match, prompt
    return int(match.group(1)) + int(match.group(2))


@pytest.fixture(scope="module")
def base(tiny_default):
    return AutoModelForCausalLM.from_pretrained(tiny_default.model_dir), AutoTokenizer.from_pretrained(
        tiny_default.model_dir
    )


# Tokenizer


def test_tokenizer_round_trip_and_special_tokens():
    tok = build_tokenizer()
    text = "12+7=19"
    ids = tok(text + tok.eos_token)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len(text) + 2  # one token per character: digits never merge
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("a b\nC")["input_ids"], skip_special_tokens=True) == "a b\nC"
    assert None not in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id)
    assert tok.pad_token_id != tok.eos_token_id
    assert build_tokenizer()(text)["input_ids"] == tok(text)["input_ids"]  # deterministic across builds
    assert tok.get_vocab() == build_tokenizer().get_vocab()


def test_chat_template_prompt_is_prefix():
    tok = build_tokenizer()
    prompt = [{"role": "user", "content": "12+7="}]
    full = prompt + [{"role": "assistant", "content": "19"}]
    prompt_text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tok.apply_chat_template(full, tokenize=False)
    assert full_text.startswith(prompt_text) and full_text.endswith(tok.eos_token)
    prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = tok.apply_chat_template(full, tokenize=True, return_dict=True)
    assert full_ids["input_ids"][: len(prompt_ids["input_ids"])] == prompt_ids["input_ids"]
    assert full_ids["input_ids"].count(tok.bos_token_id) == 1  # the template adds BOS once, encoding adds none
    # Plain text: the prompt's ids are a prefix of prompt+completion's (what TRL's KTO preprocessing relies on).
    assert tok("12+7=19" + tok.eos_token)["input_ids"][:6] == tok("12+7=")["input_ids"]


def test_build_model_matches_tokenizer():
    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 5_000_000
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.config.bos_token_id == tok.bos_token_id
    other = build_model(tok, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


# Data


def test_heldout_prompts_never_in_training_data():
    prompts, answers = heldout_prompts()
    assert len(prompts) == len(set(prompts)) > 0
    assert all(_sum(p) == int(a) for p, a in zip(prompts, answers))
    assert heldout_prompts(10) == (prompts[:10], answers[:10])
    heldout = set(prompts)
    kto = make_kto_dataset(3000, seed=3)
    kto_chat = make_kto_dataset(500, seed=4, conversational=True)
    paired = make_paired_dataset(2000, seed=5)
    corpus = pretraining_corpus(tiny.PRETRAIN_STEPS * tiny.PRETRAIN_BATCH_SIZE, seed=0)
    seen = set(kto["prompt"]) | {m[0]["content"] for m in kto_chat["prompt"]} | set(paired["prompt"])
    seen |= {prompt for prompt, _ in corpus}
    assert not heldout & seen
    # The held-out split is usable as eval data, and only it.
    assert set(make_kto_dataset(200, split="heldout")["prompt"]) <= heldout


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.8])
def test_kto_dataset_labels_match_arithmetic(ratio):
    ds = make_kto_dataset(400, seed=1, desirable_ratio=ratio)
    assert set(ds.column_names) == {"prompt", "completion", "label"}
    assert ds.features["label"].dtype == "bool"
    assert all(isinstance(label, bool) for label in ds["label"])
    assert sum(ds["label"]) == round(400 * ratio)
    off_by_one = 0
    for row in ds:
        right = _sum(row["prompt"])
        assert row["completion"].isdigit()
        assert (int(row["completion"]) == right) == row["label"]
        assert is_correct(row["prompt"], row["completion"]) == row["label"]
        off_by_one += int(row["completion"]) == right + 1
    assert off_by_one > 0.3 * (400 - sum(ds["label"]))  # the base model's systematic error is well represented


def test_kto_dataset_conversational_and_deterministic():
    ds = make_kto_dataset(50, seed=2, conversational=True)
    for row in ds:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["completion"]] == ["assistant"]
        right = _sum(row["prompt"][0]["content"])
        assert (row["completion"][0]["content"] == str(right)) == row["label"]
    assert make_kto_dataset(50, seed=2).to_dict() == make_kto_dataset(50, seed=2).to_dict()
    assert make_kto_dataset(50, seed=2).to_dict() != make_kto_dataset(50, seed=3).to_dict()
    with pytest.raises(ValueError):
        make_kto_dataset(10, desirable_ratio=1.5)
    with pytest.raises(ValueError):
        make_kto_dataset(10, split="test")


def test_paired_dataset():
    ds = make_paired_dataset(200, seed=0)
    assert set(ds.column_names) == {"prompt", "chosen", "rejected"}
    for row in ds:
        right = _sum(row["prompt"])
        assert row["chosen"] == str(right)
        assert row["rejected"] != str(right) and int(row["rejected"]) >= 0
    chat = make_paired_dataset(5, seed=0, conversational=True)
    assert chat[0]["chosen"][0]["role"] == "assistant" and chat[0]["prompt"][0]["role"] == "user"


def test_pretraining_corpus_is_partly_wrong_and_systematic():
    corpus = pretraining_corpus(4000, seed=0)
    deltas = [int(c) - _sum(p) for p, c in corpus]
    assert set(deltas) == {0, 1}  # right or off by exactly one, nothing else
    assert 0.3 < deltas.count(0) / len(deltas) < 0.9


# Base model and cache


def test_base_model_leaves_room_to_improve(base, tiny_default):
    model, tok = base
    prompts, answers = heldout_prompts()
    model.train()
    accuracy = greedy_accuracy(model, tok, prompts, answers)
    assert model.training  # the mode is restored
    assert 0.05 < accuracy < 0.9
    assert abs(accuracy - tiny_default.base_accuracy) <= 0.02
    # Left padding: the batch size (hence the padding) does not change the greedy answers.
    assert greedy_accuracy(model, tok, prompts, answers, batch_size=7) == accuracy
    chat = [[{"role": "user", "content": p}] for p in prompts]
    assert 0.05 < greedy_accuracy(model, tok, chat, answers) < 0.9


def test_cache_reuse_is_fast_and_returns_the_same_files(tiny_default):
    files = {p.name: p.stat().st_mtime_ns for p in Path(tiny_default.model_dir).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tiny_default.json"} <= set(files)
    start = time.perf_counter()
    again = build_tiny_default()
    model = AutoModelForCausalLM.from_pretrained(again.model_dir)
    AutoTokenizer.from_pretrained(again.model_dir)
    assert time.perf_counter() - start < 5.0
    assert again == tiny_default
    assert {p.name: p.stat().st_mtime_ns for p in Path(again.model_dir).iterdir()} == files
    assert model.config.vocab_size == len(build_tokenizer())


def _short_pretraining(monkeypatch):
    original = tiny.pretrain_base_model
    monkeypatch.setattr(tiny, "pretrain_base_model", lambda model, tok, seed=0: original(model, tok, seed, steps=2))


def test_build_writes_atomically(tmp_path, monkeypatch):
    _short_pretraining(monkeypatch)
    built = build_tiny_default(cache_dir=tmp_path, seed=3)
    assert Path(built.model_dir).parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [Path(built.model_dir).name]  # no temporary directory left
    assert json.loads((Path(built.model_dir) / "tiny_default.json").read_text())["seed"] == 3
    AutoModelForCausalLM.from_pretrained(built.model_dir)
    monkeypatch.setattr(tiny, "pretrain_base_model", lambda *a, **k: pytest.fail("the cache was not reused"))
    assert build_tiny_default(cache_dir=tmp_path, seed=3) == built


def test_build_survives_a_concurrent_builder(tmp_path, monkeypatch):
    """When another process renames its build into place first, ours is discarded and theirs is returned."""
    _short_pretraining(monkeypatch)
    winner = build_tiny_default(cache_dir=tmp_path / "other", seed=4)
    winner_mtime = (Path(winner.model_dir) / "model.safetensors").stat().st_mtime_ns
    rename = os.rename

    def lose_the_race(src, dst):
        rename(winner.model_dir, dst)
        rename(src, dst)  # raises: the destination now exists and is not empty

    monkeypatch.setattr(os, "rename", lose_the_race)
    (tmp_path / "shared").mkdir()
    built = build_tiny_default(cache_dir=tmp_path / "shared", seed=4)
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [Path(built.model_dir).name]
    assert (Path(built.model_dir) / "model.safetensors").stat().st_mtime_ns == winner_mtime
