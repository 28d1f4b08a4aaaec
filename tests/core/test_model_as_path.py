"""A model given by its path (a str, as TRL's own tests pass it) goes through every start-up check like a model
object: reference syncing with a full fine-tune trains and moves the reference (TRL's `test_train_with_sync_ref_model`)."""

import torch
from conftest import cpu_args

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset


def test_sync_ref_model_with_a_model_path_syncs_the_reference(tiny_default, tmp_path):
    args = cpu_args(tmp_path, sync_ref_model=True, ref_model_sync_steps=2, max_steps=4, learning_rate=1e-2)
    trainer = KTOExtTrainer(
        model=str(tiny_default.model_dir), args=args, train_dataset=make_kto_dataset(32, seed=1),
        processing_class=tiny_default.load_tokenizer(),
    )  # fmt: skip
    assert trainer.ref_model is not None
    before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    moved = [n for n, p in trainer.ref_model.named_parameters() if not torch.equal(before[n], p)]
    assert moved  # the reference was synced to the policy (mix-up alpha: TRL's default)
    assert all(not torch.equal(before[n], policy[n]) for n in moved)
