"""Shared fixtures: the embedded tiny default (built once, cached on disk) and a tiny random model."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Tests live in one folder per part of the package (core, data, logprobs, online, cli, report, models, project); a
# test module may import the float64 references and builders of another, by module name, from any folder.
sys.path[:0] = [
    str(path)
    for path in sorted(Path(__file__).parent.iterdir())
    if (path / "__init__.py").exists() is False and path.is_dir() and path.name[0] not in "._"
]

# Two cores: keep each test process on them without oversubscription.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Precomputed reference log-probs persist on disk: keep this run's apart from the user's cache.
os.environ.setdefault("TRL_KTO_EXT_REF_CACHE", tempfile.mkdtemp(prefix="trl-kto-ext-ref-cache-"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: the tiny model's matrices are so small that a second thread only adds
    synchronisation (and, with other processes on the two cores, much waiting). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_default():
    from trl_kto_ext.models.tiny import build_tiny_default

    return build_tiny_default()


@pytest.fixture
def tiny_tokenizer():
    from trl_kto_ext.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def small_model(tiny_tokenizer):
    """A randomly initialised tiny Llama (fast to build; for checks that need no trained base)."""
    from trl_kto_ext.models.tiny import build_model

    return build_model(tiny_tokenizer, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def cpu_args(output_dir, **overrides):
    """KTOExtConfig for fast CPU tests."""
    from trl_kto_ext import KTOExtConfig

    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return KTOExtConfig(**values)


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def collated_batch(trainer, n_rows=8):
    """The first `n_rows` training rows collated by the trainer's collator, on the trainer's device."""
    rows = [trainer.train_dataset[i] for i in range(n_rows)]
    batch = trainer.data_collator(rows)
    return {k: v.to(trainer.accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def sequence_logps(model, batch, prefix=""):
    """Plain forward, log_softmax, gather the next tokens, sum over completion tokens."""
    input_ids = batch[f"{prefix}input_ids"]
    logits = model(input_ids=input_ids, attention_mask=batch[f"{prefix}attention_mask"]).logits.float()
    per_token = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (per_token * batch[f"{prefix}completion_mask"][:, 1:]).sum(-1)
