"""The data path: loading, label decoding, messages, unpairing, validation, the eval split and sampling lengths.

`pipeline.prepare_datasets` reads as the whole path from a dataset name to checked training and eval rows. The names
below are resolved on first use, so that importing one data module does not load `datasets`.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "prepare_datasets": "trl_kto_ext.data.pipeline",
    "load_unpaired_dataset": "trl_kto_ext.data.loading",
    "load_raw_dataset": "trl_kto_ext.data.loading",
    "prepare_unpaired": "trl_kto_ext.data.loading",
    "count_labels": "trl_kto_ext.data.loading",
    "subsample_class": "trl_kto_ext.data.loading",
    "normalize_label": "trl_kto_ext.data.labels",
    "decode_labels": "trl_kto_ext.data.labels",
    "unpair_paired_dataset": "trl_kto_ext.data.unpairing",
    "train_eval_split": "trl_kto_ext.data.eval_split",
    "check_dataset": "trl_kto_ext.data.validation",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
