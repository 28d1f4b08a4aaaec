"""Random mismatched pairing for the KL rows: each row gets a partner whose prompt differs from its own."""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from trl_kto_ext.errors import UserInputError

# A random cyclic permutation is a derangement; with repeated prompts it may still pair two rows of the same prompt,
# so a few are tried before falling back to an independent draw per row.
_CYCLE_TRIES = 8
_REJECTION_TRIES = 64
# Draws from the fallback rows before a linear scan when no row of the batch or of the history has another prompt.
_DATASET_DRAWS = 32


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


SINGLE_PROMPT_NOTE = (
    "Every training row has the same prompt: KTO estimates its reference point z0 from completions paired with other "
    "prompts, and there are none, so this run trains with z0 = 0 (the loss without its reference point, as "
    "loss_type='apo_zero_unpaired' has none; trl.KTOTrainer would pair rows with themselves instead). Add rows with "
    "other prompts to estimate z0."
)


def single_prompt(dataset) -> bool:
    """True when a map-style tokenized `dataset` has rows and all share one prompt (no mismatched pair exists);
    False for a stream (it cannot be counted without being read) or a dataset without `prompt_ids`."""
    if not isinstance(dataset, Dataset) or "prompt_ids" not in dataset.column_names or len(dataset) == 0:
        return False
    first = dataset[0]["prompt_ids"]
    return all(ids == first for ids in dataset["prompt_ids"])


def add_dataset_kl_pairing(dataset, seed: int, unset: bool = False):
    """Adds `KL_completion_ids`: each row's completion partner, a row with another prompt drawn at random. A stream is
    refused, or returned as it is when `unset` (kl_pairing left unset: TRL's precompute then refuses the stream with
    its own message)."""
    if not isinstance(dataset, Dataset) and unset:
        return dataset
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


@dataclass(frozen=True)
class FallbackSource:
    """Rows to draw KL completions from when a batch cannot pair, and how a message names them ("the training set").

    `rows`: a map-style `Dataset` (or any sequence of rows) or an iterable one (see `MismatchedCompletions`).
    """

    rows: Any
    name: str


class MismatchedCompletions:
    """Draws, for each row of a batch, a completion written for another prompt.

    From the batch first (`draw_kl_partners`), then from the rows of recently collated batches, then from the
    fallback rows in order: rows with random access (a map-style `Dataset`), or an iterable one (an
    `IterableDataset`) whose first `lookahead` rows are read once, by a fresh iterator, the first time they are
    needed. Any completion written for another prompt is a valid mismatched completion, wherever it comes from.

    Args:
        seed: seed of every draw.
        history_size: number of recent (prompt key, completion) rows kept.
        fallback: rows to draw from when the batch and the history have no other prompt: one set of rows, a sequence
            of `FallbackSource`s tried in order (an evaluation set, then the training set), or None.
        row_pair: maps a fallback row to its (prompt key, completion).
        lookahead: rows read from an iterable `fallback`.
    """

    def __init__(self, seed: int, history_size: int, fallback, row_pair, lookahead: int = 1000):
        self.rng = random.Random(seed)
        self.history: deque = deque(maxlen=history_size)
        if isinstance(fallback, (list, tuple)) and fallback and all(isinstance(f, FallbackSource) for f in fallback):
            self._named = True
            sources = list(fallback)
        else:
            self._named = False
            sources = [] if fallback is None else [FallbackSource(fallback, "the fallback rows")]
        self._sources = [source for source in sources if source.rows is not None]
        self._row_pair = row_pair
        self._lookahead = lookahead
        self._stream_rows: dict[int, list] = {}

    def draw(self, keys: Sequence[Hashable], completions: Sequence) -> list:
        """The completion paired with each row's prompt; ValueError when no row with another prompt exists."""
        partners = draw_kl_partners(keys, self.rng)
        drawn = [completions[j] if j is not None else self._from_elsewhere(key) for key, j in zip(keys, partners)]
        self.history.extend(zip(keys, completions))
        return drawn

    def _fallback_rows(self, index: int):
        fallback = self._sources[index].rows
        if hasattr(fallback, "__getitem__") and hasattr(fallback, "__len__"):
            return fallback
        if index not in self._stream_rows:  # a stream: a bounded look-ahead, read by its own iterator
            rows = [self._row_pair(row) for row in itertools.islice(iter(fallback), self._lookahead)]
            self._stream_rows[index] = rows
        return _Rows(self._stream_rows[index])

    def _from_elsewhere(self, prompt_key):
        candidates = [completion for key, completion in self.history if key != prompt_key]
        if candidates:
            return self.rng.choice(candidates)
        for index in range(len(self._sources)):
            rows = self._fallback_rows(index)
            n = len(rows)
            if n == 0:
                continue
            for _ in range(_DATASET_DRAWS):
                key, completion = self._row(rows, self.rng.randrange(n))
                if key != prompt_key:
                    return completion
            start = self.rng.randrange(n)
            for offset in range(n):
                key, completion = self._row(rows, (start + offset) % n)
                if key != prompt_key:
                    return completion
        raise UserInputError(self._no_partner_message())

    def _no_partner_message(self) -> str:
        why = (
            "KTO estimates its reference point from (prompt, completion) pairs with mismatched prompts, so the data "
            "needs at least two distinct prompts"
        )
        if self._named:  # sources named by the trainer: the user never built a collator
            names = " and ".join(source.name for source in self._sources)
            return (
                f"Cannot build a KL row: every row of {names} has the same prompt. {why}: add rows with other "
                f"prompts to {self._sources[0].name} (with the command line, a larger eval_fraction holds out more "
                "prompts)."
            )
        where = (
            "the batch, the recent batches and the fallback rows all share one prompt"
            if self._sources
            else "the batch and the recent batches share one prompt, and there are no fallback rows"
        )
        return (
            f"Cannot build a KL row: no example with a different prompt is available ({where}). {why}; when using "
            "the collator on its own, pass `fallback_dataset=` (or a batch with two prompts)."
        )

    def _row(self, rows, index: int):
        row = rows[index]
        return row if isinstance(rows, _Rows) else self._row_pair(row)

    def state_dict(self) -> dict:
        return {"rng_state": self.rng.getstate(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng_state"]  # JSON turns random.Random's state tuples into lists
        self.rng.setstate((version, tuple(internal), gauss))
        self.history = deque(
            ((_as_key(key), completion) for key, completion in state["history"]), maxlen=self.history.maxlen
        )


class _Rows(list):
    """(prompt key, completion) pairs already converted from a stream's first rows."""


def _as_key(key):
    return tuple(key) if isinstance(key, list) else key
