"""Held-out evaluation split by prompt: every row of one prompt on the same side."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from datasets import Dataset

from trl_kto_ext.data.loading import count_labels
from trl_kto_ext.data.unpairing import _check_dataset, _plain

# Prompts held out at least by `train_eval_split` when the data has twice as many: eval KL rows pair within the set.
MIN_EVAL_PROMPTS = 2


def train_eval_split(
    dataset: Dataset, eval_fraction: float, seed: int = 0, *, report: Callable[[str], Any] | None = None
) -> tuple[Dataset, Dataset]:
    """Hold out about `eval_fraction` of the rows, keeping every row of one prompt on the same side (unseen prompts).

    Whole prompt groups, in seeded random order, go to eval until it holds at least round(eval_fraction * n) rows and,
    when the data has 4 or more prompts, at least `MIN_EVAL_PROMPTS` (2) of them, so that the evaluation's KL rows
    can pair completions with other prompts of the evaluation set; at least one group always stays in train. Row order
    is preserved within each side. `report`, if given (e.g. `print`), receives one line saying what was held out.
    Raises ValueError when eval_fraction is outside (0, 1), there is no `prompt` column, or all rows share one prompt.
    """
    dataset = _check_dataset(dataset)
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}.")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"No 'prompt' column (columns: {dataset.column_names}); run prepare_unpaired() first.")
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(_plain(dataset)["prompt"]):
        # Conversational prompts are lists of dicts (unhashable): key them by their canonical JSON.
        key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        groups.setdefault(key, []).append(row)
    if len(groups) < 2:
        raise ValueError(f"Cannot split by prompt: all {len(dataset)} rows share one prompt; need 2 or more.")
    members = list(groups.values())
    target = max(1, round(eval_fraction * len(dataset)))
    min_groups = MIN_EVAL_PROMPTS if len(members) >= 2 * MIN_EVAL_PROMPTS else 1
    eval_rows: list[int] = []
    n_groups = 0
    raised = False
    for g in np.random.default_rng(seed).permutation(len(members))[:-1]:  # never move the last group
        if len(eval_rows) >= target and n_groups >= min_groups:
            break
        raised = len(eval_rows) >= target  # this group is added only to reach min_groups
        eval_rows.extend(members[g])
        n_groups += 1
    if report is not None:
        why = f"eval_fraction={eval_fraction} rounds to fewer than {min_groups} prompts" if raised else None
        report(
            f"holding out {n_groups} of {len(members)} prompts ({len(eval_rows)} rows; "
            f"{why or f'eval_fraction={eval_fraction}'})."
        )
    eval_set = set(eval_rows)
    train_rows = [i for i in range(len(dataset)) if i not in eval_set]
    held_out = dataset.select(sorted(eval_rows))
    if report is not None and "label" in held_out.column_names:
        n_des, n_und = count_labels(held_out)
        if not n_des or not n_und or len(held_out) < 8:
            missing = " (no desirable rows: no eval rewards/chosen or margins)" if not n_des else ""
            missing = missing or (" (no undesirable rows: no eval rewards/rejected or margins)" if not n_und else "")
            report(
                f"note: the eval set has {n_des} desirable and {n_und} undesirable rows{missing}; eval metrics on so "
                "few rows say little: raise eval_fraction or give a test split."
            )
    return dataset.select(train_rows), held_out
