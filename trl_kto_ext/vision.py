"""KTOExtVisionCollator: TRL's vision collator with KL rows from a mismatched pairing of prompts (text and images)."""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)
import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from trl_kto_ext.data.labels import decode_labels
from trl_kto_ext.data.sampling import check_lengths
from trl_kto_ext.data.weights import add_weights
from trl_kto_ext.pairing import MismatchedCompletions
from trl_kto_ext.trl_internals import DataCollatorForVisionUnpairedPreference

# The KL batch is collated like the target batch; these of its tensors become the `KL_` keys.
_KL_KEYS = ("input_ids", "attention_mask", "completion_mask", "token_type_ids", "mm_token_type_ids")


@dataclass
class KTOExtVisionCollator(DataCollatorForVisionUnpairedPreference):
    """Collator for vision (and mixed vision / text-only) unpaired preference rows that builds the KL rows itself.

    Rows are tokenized and their images processed when collated, by TRL's `DataCollatorForVisionUnpairedPreference`
    (so the output has its keys: `input_ids`, `attention_mask`, `completion_mask`, `pixel_values`, `image_grid_thw`,
    `mm_token_type_ids`, ..., `label`). KL row i is prompt i, with its images, followed by the completion of a row
    whose prompt differs from prompt i (text or images), drawn at random (seeded) from the batch, then from recently
    collated rows, then from `fallback_dataset` (TRL instead rotates completions by one within the batch, which pairs
    a prompt with its own completion when two rows share a prompt, and a batch of one with itself). The KL rows are
    collated as a second batch of the same prompts, so their image features equal the targets'; their tensors are
    returned as `KL_input_ids`, `KL_attention_mask`, `KL_completion_mask` (and `KL_token_type_ids`,
    `KL_mm_token_type_ids` when the processor gives token types), each of shape [B, L_KL].

    Args:
        processor, max_length, calculate_kl, pad_to_multiple_of, return_tensors: as in TRL's collator.
        seed: seed of the pairing.
        fallback_dataset: raw rows (`prompt`, `completion`, images) to draw a completion from when the batch and the
            history have no other prompt; a `Dataset`, or an `IterableDataset` whose first `stream_lookahead` rows
            are read once.
        history_size: number of recent (prompt, completion) rows kept for that purpose.
        stream_lookahead: rows read from a streamed `fallback_dataset`.
    """

    seed: int = 0
    fallback_dataset: Any = field(default=None, repr=False)
    history_size: int = 256
    stream_lookahead: int = 1000

    def __post_init__(self):
        self._pairs = MismatchedCompletions(
            self.seed, self.history_size, self.fallback_dataset, _prompt_key_and_completion, self.stream_lookahead
        )

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [_with_image_list(ex) for ex in examples]
        batch = self._collate(examples)
        if self.calculate_kl:
            keys = [prompt_key(ex) for ex in examples]
            completions = self._pairs.draw(keys, [ex["completion"] for ex in examples])
            kl_batch = self._collate([dict(ex, completion=c) for ex, c in zip(examples, completions)])
            batch.update({f"KL_{key}": kl_batch[key] for key in _KL_KEYS if key in kl_batch})
        return add_weights(batch, examples)  # a per-row `weight` column, as for text rows

    def _collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        # TRL's collator rewrites the rows it is given (images, messages): give it copies.
        rows = [
            dict(ex, prompt=copy.deepcopy(ex["prompt"]), completion=copy.deepcopy(ex["completion"])) for ex in examples
        ]
        calculate_kl, self.calculate_kl = self.calculate_kl, False
        try:
            return super().torch_call(rows)
        finally:
            self.calculate_kl = calculate_kl

    def state_dict(self) -> dict[str, Any]:
        """Random state and history, saved in checkpoints so that a resumed run draws the same pairings."""
        return self._pairs.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pairs.load_state_dict(state)


def _with_image_list(example: dict[str, Any]) -> dict[str, Any]:
    example = dict(example)
    if "image" in example:
        image = example.pop("image")
        example["images"] = [image] if image is not None else []
    example.setdefault("images", [])
    return example


def prompt_key(example: dict[str, Any]) -> str:
    """A digest of a row's prompt: its text (or messages) and the pixels of its images."""
    example = _with_image_list(example)
    digest = hashlib.sha1(json.dumps(example["prompt"], sort_keys=True, default=_image_digest).encode())
    for image in example["images"] or []:
        digest.update(_image_digest(image).encode())
    return digest.hexdigest()


def _image_digest(obj: Any) -> str:
    if hasattr(obj, "tobytes") and hasattr(obj, "size"):  # a PIL image
        return hashlib.sha1(repr((obj.mode, obj.size)).encode() + obj.tobytes()).hexdigest()
    if isinstance(obj, dict) and obj.get("bytes") is not None:  # an undecoded datasets Image
        return hashlib.sha1(obj["bytes"]).hexdigest()
    return repr(obj)


def _prompt_key_and_completion(row: dict[str, Any]) -> tuple[str, Any]:
    return prompt_key(row), row["completion"]


def vision_collator(processor, args, calculate_kl: bool, seed: int, train_dataset) -> KTOExtVisionCollator:
    """The trainer's collator for vision rows, falling back on `train_dataset` for KL completions.

    Raises:
        ValueError: `kl_pairing="dataset"` (it needs a tokenized training set; vision rows are tokenized when
            collated), or a length-aware `train_sampling_strategy` without a `length_column_name` column.
    """
    if calculate_kl and args.kl_pairing == "dataset":
        raise ValueError(
            "kl_pairing='dataset' needs a tokenized training set, but vision rows are tokenized when collated; "
            "use kl_pairing='batch' (the default) for vision datasets."
        )
    check_lengths(train_dataset, args)  # a length-aware sampler on rows without a length column: stop now
    return KTOExtVisionCollator(
        processor=processor,
        max_length=args.max_length,
        calculate_kl=calculate_kl,
        pad_to_multiple_of=args.pad_to_multiple_of,
        seed=seed,
        fallback_dataset=train_dataset,
    )


def with_decoded_labels(datasets):
    """A dataset (or dict of them, or None) of vision rows with a `ClassLabel` label read by its class names.

    TRL does not prepare vision datasets (their rows are tokenized when collated), so the trainer's conversion of
    text rows does not reach them. ValueError for class names that are not recognised.
    """
    if isinstance(datasets, dict):
        return {name: decode_labels(dataset) for name, dataset in datasets.items()}
    return decode_labels(datasets) if datasets is not None else None
