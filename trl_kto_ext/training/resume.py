"""Keeps the KL pairing exact across `resume_from_checkpoint`: the collator state is saved with each checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque

from trl_kto_ext.collator import KTOExtCollator
from trl_kto_ext.pairing import FallbackSource
from trl_kto_ext.vision import KTOExtVisionCollator

# Collators that draw the KL pairing themselves and carry a state to save.
_PAIRING_COLLATORS = (KTOExtCollator, KTOExtVisionCollator)

PAIRING_STATE_FILE = "kl_pairing_state.json"


@dataclasses.dataclass
class _PairingRecorder:
    """Collate function of the training dataloader: notes the collator's state before each batch it builds.

    The dataloader collates ahead of the training loop (accelerate looks one batch ahead, and the loop fetches all
    the micro-batches of a step at once), so at a checkpoint the collator has already drawn the pairing of batches
    that were not trained on. The state saved is the one noted before the first of those.
    """

    collator: KTOExtCollator | KTOExtVisionCollator
    pending: deque

    def __call__(self, features):
        self.pending.append(self.collator.state_dict())
        return self.collator(features)


def collator_for_dataloader(trainer, is_training: bool, dataset=None):
    """The collate function of a new dataloader: training batches are recorded (see `_PairingRecorder`); evaluation
    gets a fresh copy of the collator that falls back on `dataset` itself (the evaluation set), then on the training
    set, for the KL rows a batch cannot pair, so evaluating neither moves the training pairing nor depends on when it
    runs.
    """
    collator = trainer.data_collator
    if not isinstance(collator, _PAIRING_COLLATORS):
        return collator
    if not is_training:
        return dataclasses.replace(collator, fallback_dataset=_eval_fallback(trainer, collator, dataset))
    trainer._pairing_pending = deque()
    return _PairingRecorder(collator, trainer._pairing_pending)


def _eval_fallback(trainer, collator, dataset) -> list[FallbackSource]:
    """The evaluation set, then the training set (or the collator's own fallback rows): a completion written for
    another prompt of either is a valid mismatched completion for an evaluation row."""
    sources = [FallbackSource(dataset, "the evaluation set")] if dataset is not None else []
    own = collator.fallback_dataset
    if isinstance(own, (list, tuple)) and all(isinstance(source, FallbackSource) for source in own):
        return sources + list(own)
    if own is None or own is trainer.train_dataset:
        sources.append(FallbackSource(trainer.train_dataset, "the training set"))
    else:
        sources.append(FallbackSource(own, "the collator's fallback_dataset"))
    return sources


def _state_path(trainer, directory: str) -> str:
    index = trainer.args.process_index  # each process pairs its own batches
    return os.path.join(directory, PAIRING_STATE_FILE if index == 0 else f"kl_pairing_state_{index}.json")


def save_pairing_state(trainer, output_dir: str) -> None:
    collator = trainer.data_collator
    if not isinstance(collator, _PAIRING_COLLATORS):
        return
    pending = getattr(trainer, "_pairing_pending", None)
    state = dict(pending[0] if pending else collator.state_dict())
    state["num_tokens"] = trainer._total_train_tokens  # the cumulative `num_tokens` metric
    os.makedirs(output_dir, exist_ok=True)
    with open(_state_path(trainer, output_dir), "w") as f:
        json.dump(state, f)


def load_pairing_state(trainer, checkpoint: str | None) -> None:
    """Restores the pairing saved in `checkpoint`; called before the resumed run collates its first batch."""
    if not checkpoint or not isinstance(trainer.data_collator, _PAIRING_COLLATORS):
        return
    path = _state_path(trainer, checkpoint)
    if not os.path.isfile(path):
        path = os.path.join(checkpoint, PAIRING_STATE_FILE)
        if not os.path.isfile(path):
            return
    with open(path) as f:
        state = json.load(f)
    trainer.data_collator.load_state_dict(state)
    trainer._total_train_tokens = state.get("num_tokens", trainer._total_train_tokens)
    if getattr(trainer, "_pairing_pending", None) is not None:
        trainer._pairing_pending.clear()
