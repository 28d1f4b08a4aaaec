"""KTOExtCollator: pads a KTO batch and builds its KL rows from a random mismatched pairing at collation time."""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)
from dataclasses import dataclass, field
from typing import Any

from trl_kto_ext.data.weights import add_weights
from trl_kto_ext.errors import UserInputError
from trl_kto_ext.pairing import MismatchedCompletions
from trl_kto_ext.trl_internals import DataCollatorForUnpairedPreference


@dataclass
class KTOExtCollator(DataCollatorForUnpairedPreference):
    """Collator for unpaired preference data that builds the KL rows itself.

    Row i of the KL batch is prompt i followed by the completion of another example whose prompt differs from prompt
    i, drawn at random from the batch (seeded, reproducible). When the batch cannot supply one (a batch of one row,
    or all rows sharing a prompt), the completion comes from recently collated batches, then from `fallback_dataset`.
    Padding and truncation are TRL's `DataCollatorForUnpairedPreference`, so the output keys are the same:
    `input_ids`, `attention_mask`, `completion_mask`, `KL_input_ids`, `KL_attention_mask`, `KL_completion_mask`,
    `label` (and `ref_logps` when the examples carry cached reference log-probs), plus `weight` (float32 [B]) when
    the examples carry a per-row `weight`.

    Args:
        pad_token_id: token used for padding.
        max_length: sequences longer than this are truncated before padding.
        pad_to_multiple_of: pad the length to a multiple of this value.
        seed: seed of the pairing; the same seed gives the same pairings for the same batches.
        build_kl: build the KL rows (False for losses without a reference point, e.g. `apo_zero_unpaired`).
        fallback_dataset: rows with `prompt_ids` / `completion_ids` to draw from when the batch and the history have
            no other prompt (the trainer passes its tokenized training or evaluation set). A `Dataset` is drawn from
            at random; of an `IterableDataset`, the first `stream_lookahead` rows are read once by a fresh iterator.
        history_size: number of recent (prompt, completion) rows kept for that purpose.
        use_dataset_pairing: keep the `KL_completion_ids` (and `ref_KL_logps`) that examples already carry, from a
            pairing fixed over the dataset (`kl_pairing="dataset"`); rows without them are paired in the batch.
        stream_lookahead: rows read from a streamed `fallback_dataset`.

    Example:
    ```python
    >>> from trl_kto_ext import KTOExtCollator
    >>> collator = KTOExtCollator(pad_token_id=0, seed=0)
    >>> batch = collator([
    ...     {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True},
    ...     {"prompt_ids": [7, 8], "completion_ids": [9], "label": False},
    ... ])
    >>> batch["KL_input_ids"]  # prompt i followed by the other row's completion
    tensor([[1, 2, 3, 9],
            [7, 8, 4, 5]])
    >>> batch["KL_completion_mask"]
    tensor([[0, 0, 0, 1],
            [0, 0, 1, 1]])

    ```
    """

    seed: int = 0
    build_kl: bool = True
    fallback_dataset: Any = field(default=None, repr=False)
    history_size: int = 256
    use_dataset_pairing: bool = False
    stream_lookahead: int = 1000

    def __post_init__(self):
        self._pairs = MismatchedCompletions(
            self.seed, self.history_size, self.fallback_dataset, _prompt_and_completion, self.stream_lookahead
        )

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.use_dataset_pairing and all("KL_completion_ids" in ex for ex in examples):
            return add_weights(super().torch_call(examples), examples)
        # KL completions (and their cached reference log-probs) from elsewhere belong to another pairing: drop them.
        examples = [{k: v for k, v in ex.items() if k not in ("KL_completion_ids", "ref_KL_logps")} for ex in examples]
        if self.build_kl:
            kl_completions = self.kl_completions(examples)
            examples = [dict(ex, KL_completion_ids=c) for ex, c in zip(examples, kl_completions)]
        return add_weights(super().torch_call(examples), examples)

    def kl_completions(self, examples: list[dict[str, Any]]) -> list[list[int]]:
        """The completion ids paired with each example's prompt for the KL rows."""
        keys = [tuple(ex["prompt_ids"]) for ex in examples]
        return self._pairs.draw(keys, [list(ex["completion_ids"]) for ex in examples])

    def state_dict(self) -> dict[str, Any]:
        """Random state and history, saved in checkpoints so that a resumed run draws the same pairings."""
        return self._pairs.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pairs.load_state_dict(state)


def _prompt_and_completion(row: dict[str, Any]) -> tuple[tuple[int, ...], list[int]]:
    return tuple(row["prompt_ids"]), list(row["completion_ids"])


def keep_kl_rows(batch: dict[str, Any], n_rows: int) -> dict[str, Any]:
    """The batch with only its first `n_rows` KL rows (random rows: the pairing is random), padding trimmed."""
    if batch["KL_input_ids"].size(0) <= n_rows:
        return batch
    if "pixel_values" in batch:
        raise UserInputError(
            "kl_subset_size is not supported with image inputs: the KL rows are run with the batch's images, which "
            "belong to all its rows. Leave kl_subset_size unset (None) for vision datasets."
        )
    batch = dict(batch)
    width = int(batch["KL_attention_mask"][:n_rows].sum(-1).max())  # right padding: trailing columns are padding
    for key in ("KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids"):
        if key in batch:
            batch[key] = batch[key][:n_rows, :width]
    if "ref_KL_logps" in batch:
        batch["ref_KL_logps"] = batch["ref_KL_logps"][:n_rows]
    return batch
