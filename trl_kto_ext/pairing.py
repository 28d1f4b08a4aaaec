"""Random mismatched pairing for the KL rows: each row gets a partner whose prompt differs from its own."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

from datasets import Dataset

# A random cyclic permutation is a derangement; with repeated prompts it may still pair two rows of the same prompt,
# so a few are tried before falling back to an independent draw per row.
_CYCLE_TRIES = 8
_REJECTION_TRIES = 64


def draw_kl_partners(prompt_keys: Sequence[Hashable], rng: random.Random) -> list[int | None]:
    """For each row i, return the index j of a row with `prompt_keys[j] != prompt_keys[i]`, drawn at random.

    A random cyclic permutation (Sattolo's algorithm) is preferred, so that the KL rows reuse each completion of the
    batch once, as the paper's estimator does; when repeated prompts make every tried cycle invalid, each row draws
    its partner uniformly among the rows with a different prompt. Rows whose prompt is shared by the whole batch get
    `None`: the caller must find them a completion outside the batch.

    >>> import random
    >>> draw_kl_partners(["a", "b"], random.Random(0))
    [1, 0]
    >>> draw_kl_partners(["a", "a"], random.Random(0))
    [None, None]
    """
    n = len(prompt_keys)
    if n < 2 or len(set(prompt_keys)) < 2:
        return [None] * n
    for _ in range(_CYCLE_TRIES):
        cycle = _random_cycle(n, rng)
        if all(prompt_keys[i] != prompt_keys[cycle[i]] for i in range(n)):
            return cycle
    partners: list[int | None] = []
    for i in range(n):
        partners.append(_draw_other_prompt(i, prompt_keys, rng))
    return partners


def _draw_other_prompt(i: int, prompt_keys: Sequence[Hashable], rng: random.Random) -> int:
    # Rejection sampling is O(1) per row unless one prompt dominates; the exhaustive list is the rare fallback.
    n = len(prompt_keys)
    for _ in range(_REJECTION_TRIES):
        j = rng.randrange(n)
        if prompt_keys[j] != prompt_keys[i]:
            return j
    return rng.choice([j for j in range(n) if prompt_keys[j] != prompt_keys[i]])


def _random_cycle(n: int, rng: random.Random) -> list[int]:
    """Sattolo's algorithm: a uniformly random permutation made of a single n-cycle (so no fixed point)."""
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def add_dataset_kl_pairing(dataset, seed: int):
    """Adds `KL_completion_ids`: each row's completion partner, a row with another prompt drawn at random."""
    if not isinstance(dataset, Dataset):
        raise ValueError("kl_pairing='dataset' needs a map-style Dataset (its length must be known); use 'batch'.")
    keys = [tuple(ids) for ids in dataset["prompt_ids"]]
    partners = draw_kl_partners(keys, random.Random(seed))
    if any(j is None for j in partners):
        raise ValueError(
            "Every training row has the same prompt: KTO estimates its reference point from completions paired with "
            "other prompts, so the data needs at least two distinct prompts."
        )
    completions = dataset["completion_ids"]
    return dataset.add_column("KL_completion_ids", [list(completions[j]) for j in partners])
