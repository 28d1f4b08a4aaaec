"""trl-kto-ext: KTO for Hugging Face TRL with collation-time KL pairing and automatic loss aversion."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Names are resolved on first use so that `import trl_kto_ext` stays light: transformers' TrainingArguments pulls in
# peft, and peft pulls in bitsandbytes. `kto_loss` and `KTOExtCollator` need only torch (and TRL's collator).
_LAZY = {
    "KTOExtConfig": "trl_kto_ext.config",
    "KTOExtTrainer": "trl_kto_ext.trainer",
    "KTOExtCollator": "trl_kto_ext.collator",
    "kto_loss": "trl_kto_ext.loss",
    "KTOLossOutput": "trl_kto_ext.loss",
    "KTOLossMetrics": "trl_kto_ext.loss",
    "resolve_loss_aversion": "trl_kto_ext.loss_aversion",
    "LossAversion": "trl_kto_ext.loss_aversion",
    "OnlineKTOConfig": "trl_kto_ext.online.config",
    "OnlineKTOTrainer": "trl_kto_ext.online.trainer",
}

__all__ = [
    "KTOExtCollator",
    "KTOExtConfig",
    "KTOExtTrainer",
    "KTOLossMetrics",
    "KTOLossOutput",
    "LossAversion",
    "OnlineKTOConfig",
    "OnlineKTOTrainer",
    "__version__",
    "kto_loss",
    "resolve_loss_aversion",
]

if TYPE_CHECKING:
    from trl_kto_ext.collator import KTOExtCollator
    from trl_kto_ext.config import KTOExtConfig
    from trl_kto_ext.loss import KTOLossMetrics, KTOLossOutput, kto_loss
    from trl_kto_ext.loss_aversion import LossAversion, resolve_loss_aversion
    from trl_kto_ext.online.config import OnlineKTOConfig
    from trl_kto_ext.online.trainer import OnlineKTOTrainer
    from trl_kto_ext.trainer import KTOExtTrainer


def __getattr__(name: str):
    if name in _LAZY:
        from trl_kto_ext.training.library_messages import quiet_library_logs

        quiet_library_logs()  # before the trainers import peft, which imports bitsandbytes (its `kernels` request)
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_kto_ext' has no attribute {name!r}")


def __dir__():
    return __all__
