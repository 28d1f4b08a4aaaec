"""The one seam to TRL's internals: every private or version-specific TRL name this package uses, read from TRL 1.16.

Elsewhere the package uses only TRL's public top-level API (`from trl import KTOConfig`, ...). A name below is either
imported from a TRL submodule (`NAMES`, resolved on first use so that importing one does not load the others), a
private method of `trl.KTOTrainer` / `transformers.Trainer` that `KTOExtTrainer` or `OnlineKTOTrainer` overrides
(`PRIVATE_HOOKS`), or a private attribute of those trainers that the package reads or writes (`PRIVATE_ATTRIBUTES`).
Each entry says what it is for. `tests/test_layout.py` fails when a module outside this one imports from a TRL
submodule or a private TRL name, overrides a private trainer hook or touches a private trainer attribute not listed
here, or when a listed name is missing from the installed TRL. Supporting a new TRL release is work in this file.
"""

from __future__ import annotations

import importlib
from typing import Any

from trl_kto_ext import compat  # noqa: F401  (first: an unsupported TRL stops here with the supported range)

TRL_VERSION_READ = "1.16.0"

# name -> (TRL module, attribute, what this package uses it for)
NAMES: dict[str, tuple[str, str, str]] = {
    "DataCollatorForUnpairedPreference": (
        "trl.trainer.kto_trainer",
        "DataCollatorForUnpairedPreference",
        "base class of KTOExtCollator: TRL's padding and truncation of KTO rows, so batch keys stay TRL's",
    ),
    "DataCollatorForVisionUnpairedPreference": (
        "trl.trainer.kto_trainer",
        "DataCollatorForVisionUnpairedPreference",
        "base class of KTOExtVisionCollator: TRL's image processing of vision KTO rows",
    ),
    "ChunkedLogProbFunction": (
        "trl.trainer.utils",
        "_ChunkedLogProbFunction",
        "TRL's chunked log-prob kernel, run by logprobs.completion on the completion positions only",
    ),
    "CHUNKED_LOGPROB_CHUNK_SIZE": (
        "trl.trainer.utils",
        "_CHUNKED_LOGPROB_CHUNK_SIZE",
        "the chunk size TRL's kernel is tuned for (logprobs.completion uses the same)",
    ),
    "FusedCausalLMOutput": (
        "trl.trainer.utils",
        "FusedCausalLMOutput",
        "the output type of TRL's fused LM head, returned by the completion-only head",
    ),
    "maybe_gather_lm_head_ctx": (
        "trl.trainer.utils",
        "maybe_gather_lm_head_ctx",
        "gathers a sharded LM head (ZeRO-3/FSDP) around the completion-only head",
    ),
    "add_fused_lm_head": (
        "trl.trainer.utils",
        "add_fused_lm_head",
        "installs TRL's fused LM head on the reference copies the trainer makes",
    ),
    "create_model_from_path": (
        "trl.trainer.utils",
        "create_model_from_path",
        "reloads a reference that was not kept (every log-prob cached) as TRL loads a model given by its path",
    ),
    "hash_module": (
        "trl.trainer.utils",
        "hash_module",
        "checks that a reloaded reference is the model whose log-probs were cached (TRL's precompute hash)",
    ),
    "use_adapter": (
        "trl.trainer.utils",
        "use_adapter",
        "switches a PEFT model to its 'ref' adapter (or adapters off) for the reference pass",
    ),
    "prepare_deepspeed": (
        "trl.models",
        "prepare_deepspeed",
        "wraps a reference model for DeepSpeed as TRL's trainers do",
    ),
    "tokenize_row": (
        "trl.data_utils",
        "_tokenize",
        "online KTO: tokenizes a sampled prompt exactly as KTOTrainer tokenizes dataset prompts",
    ),
}

# The logger KTOTrainer warns through (its module name): filtered while the trainer sets itself up.
KTO_TRAINER_LOGGER = "trl.trainer.kto_trainer"

# Private methods of trl.KTOTrainer / transformers.Trainer overridden here, each the narrowest hook for the change.
PRIVATE_HOOKS: dict[str, str] = {
    "_prepare_dataset": "unpair paired rows first and check rows before TRL tokenizes them; online: no tokenizing",
    "_get_train_sampler": "gives length-aware samplers the KTO row lengths (prompt + completion ids)",
    "_precompute_ref_logps": "the reference cache: one length-sorted pass, persisted on disk",
    "_compute_loss": "the KTO loss from the pure `kto_loss` on the fast path's log-probs",
    "_compute_kl_logps": "the KL rows' log-probs on the fast path",
    "_get_dataloader": "eval/predict batches paired like training batches; online: prompt batches",
    "_save_rng_state": "saves the collator's pairing state with each checkpoint",
    "_load_optimizer_and_scheduler": "restores the collator's pairing state on resume",
    "_prepare_inputs": "online KTO: samples and labels completions for a batch of prompts",
    "_remove_unused_columns": "online KTO: prompt rows keep their columns for the reward functions",
    "_set_signature_columns_if_needed": "keeps a dataset's per-row `weight` column for the collator",
}

# Private attributes of a KTOTrainer instance (or class) that this package reads or writes.
PRIVATE_ATTRIBUTES: dict[str, str] = {
    "_metrics": "the per-mode metric lists TRL logs from; the step metrics and guards append to them",
    "_tokenizer": "the tokenizer TRL takes from the processing class (a processor's tokenizer for vision rows)",
    "_is_vision_dataset": "whether TRL saw image rows (the vision collator is used then)",
    "_total_train_tokens": "the cumulative `num_tokens` metric (kept across resume)",
    "_tp_size": "tensor-parallel size TRL divides token counts by",
    "_tag_names": "the model tags TRL writes into the card",
    "_paper": "the KTO paper's citation TRL holds, quoted in the model card",
    "_signature_columns": "the dataset columns Trainer keeps; the per-row `weight` column is added to TRL's",
}


def __getattr__(name: str) -> Any:
    if name not in NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute, _ = NAMES[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
