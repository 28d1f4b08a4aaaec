"""The embedded addition task: "a+b=" prompts, a fixed held-out split, noisy corpus, preference data and a verifier."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from datasets import Dataset

# Task: "a+b=" with 0 <= a <= MAX_A and 0 <= b <= MAX_B. Two-digit plus one-digit is what a ~0.5M-parameter model
# learns, and generalises, in a few hundred steps; two-digit plus two-digit took several times longer. A fixed split,
# independent of every `seed` argument, holds out HELDOUT_SIZE operand pairs that no training data ever contains.
MAX_A = 99
MAX_B = 9
HELDOUT_SIZE = 100
_SPLIT_SEED = 1234

# The pretraining corpus is right only part of the time and otherwise off by one (a+b+1). The error rate depends on a
# learnable feature of the prompt (a carry out of the units digit), so the base model answers most no-carry prompts
# right and most carry prompts wrong (greedy held-out accuracy ~0.6), while the right answer keeps a large share of
# probability everywhere: preference training has a clear, reachable signal.
P_CORRECT_NO_CARRY = 0.85
P_CORRECT_CARRY = 0.3
# Wrong answers in the preference data: the systematic a+b+1, a+b-1, or another wrong number. Undesirable rows on
# both sides of the right answer matter: with mostly a+b+1 rows, KTO taught the tiny model to answer a+b-1 instead
# (held-out accuracy fell from 0.59 to about 0.3); with this mix it rises to about 0.85-0.9.
WRONG_PLUS_ONE_SHARE = 0.5
WRONG_MINUS_ONE_SHARE = 0.3


def _pairs(split: str) -> list[tuple[int, int]]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    pairs = [(a, b) for a in range(MAX_A + 1) for b in range(MAX_B + 1)]
    random.Random(_SPLIT_SEED).shuffle(pairs)
    return pairs[:HELDOUT_SIZE] if split == "heldout" else pairs[HELDOUT_SIZE:]


def format_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def is_correct(prompt: str | list[dict[str, str]], completion: str | list[dict[str, str]]) -> bool:
    """Whether `completion` is the right answer to an "a+b=" prompt (plain or chat form; whitespace ignored)."""
    prompt = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    completion = completion if isinstance(completion, str) else completion[-1]["content"]
    a, b = prompt.strip().rstrip("=").split("+")
    return completion.strip() == str(int(a) + int(b))


def _wrong_answer(a: int, b: int, rng: random.Random) -> int:
    draw, total = rng.random(), a + b
    if draw < WRONG_PLUS_ONE_SHARE or (total == 0 and draw < WRONG_PLUS_ONE_SHARE + WRONG_MINUS_ONE_SHARE):
        return total + 1
    if draw < WRONG_PLUS_ONE_SHARE + WRONG_MINUS_ONE_SHARE:
        return total - 1
    return rng.choice([x for x in (total + 2, total - 2, total + 10, total - 10) if x >= 0])


def pretraining_corpus(n_rows: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, completion) rows of the noisy pretraining corpus, over train-split prompts only."""
    rng, pairs = random.Random(seed), _pairs("train")
    rows = []
    for _ in range(n_rows):
        a, b = rng.choice(pairs)
        p_correct = P_CORRECT_CARRY if a % 10 + b % 10 >= 10 else P_CORRECT_NO_CARRY
        rows.append((format_prompt(a, b), str(a + b if rng.random() < p_correct else a + b + 1)))
    return rows


def _message(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def make_kto_dataset(
    n_rows: int, seed: int = 0, desirable_ratio: float = 0.5, conversational: bool = False, split: str = "train"
) -> Dataset:
    """Unpaired preference rows (`prompt`, `completion`, `label`): desirable ones are right, undesirable ones wrong."""
    if not 0.0 <= desirable_ratio <= 1.0:
        raise ValueError(f"desirable_ratio must lie in [0, 1], got {desirable_ratio}")
    rng, pairs = random.Random(seed), _pairs(split)
    n_desirable = round(n_rows * desirable_ratio)  # exact count, so small datasets keep the requested balance
    labels = [True] * n_desirable + [False] * (n_rows - n_desirable)
    rng.shuffle(labels)
    rows: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": labels}
    for label in labels:
        a, b = rng.choice(pairs)
        prompt, completion = format_prompt(a, b), str(a + b if label else _wrong_answer(a, b, rng))
        rows["prompt"].append(_message("user", prompt) if conversational else prompt)
        rows["completion"].append(_message("assistant", completion) if conversational else completion)
    return Dataset.from_dict(rows)


def make_paired_dataset(n_pairs: int, seed: int = 0, conversational: bool = False, split: str = "train") -> Dataset:
    """Paired preference rows (`prompt`, `chosen`, `rejected`): chosen is the right answer, rejected a wrong one."""
    rng, pairs = random.Random(seed), _pairs(split)
    rows: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n_pairs):
        a, b = rng.choice(pairs)
        prompt, chosen, rejected = format_prompt(a, b), str(a + b), str(_wrong_answer(a, b, rng))
        rows["prompt"].append(_message("user", prompt) if conversational else prompt)
        rows["chosen"].append(_message("assistant", chosen) if conversational else chosen)
        rows["rejected"].append(_message("assistant", rejected) if conversational else rejected)
    return Dataset.from_dict(rows)


def heldout_prompts(n: int | None = None) -> tuple[list[str], list[str]]:
    """The first `n` (default: all) held-out prompts and their correct answers."""
    pairs = _pairs("heldout")[:n]
    return [format_prompt(a, b) for a, b in pairs], [str(a + b) for a, b in pairs]


def exact_answer_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Verifier of the addition task for online training: 1.0 when a completion is the right answer to its "a+b="
    prompt (plain or chat form, whitespace ignored; the same check as `greedy_accuracy`), else 0.0.

    Follows TRL's reward-function signature (`prompts`, `completions`, extra columns as keyword arguments).
    """
    return [1.0 if is_correct(p, c) else 0.0 for p, c in zip(prompts, completions, strict=True)]


def make_prompt_dataset(
    prompts: Sequence[str] | None = None, split: str = "train", conversational: bool = False
) -> Dataset:
    """A prompt dataset (`prompt`, `answer`) for online training: the given "a+b=" prompts, or every prompt of
    `split` (the held-out prompts are never in the train split)."""
    texts = list(prompts) if prompts is not None else [format_prompt(a, b) for a, b in _pairs(split)]
    answers = [str(sum(int(x) for x in p.rstrip("=").split("+"))) for p in texts]
    rows = [_message("user", p) for p in texts] if conversational else texts
    return Dataset.from_dict({"prompt": rows, "answer": answers})
