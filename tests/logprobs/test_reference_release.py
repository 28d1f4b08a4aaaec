"""With every reference log-prob cached (precompute_ref_log_probs, kl_pairing unset), no reference copy is kept; a
later pass that needs the reference reloads it from the model's path (checked against the cached weights' hash) or
stops with one line naming the fix."""

import shutil

import pytest
import torch
from conftest import cpu_args

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset


def build(model, tokenizer, tmp_path, eval_dataset=None, **overrides):
    args = cpu_args(
        tmp_path, precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache"), max_steps=2, **overrides
    )
    return KTOExtTrainer(
        model=model,
        args=args,
        train_dataset=make_kto_dataset(16, seed=1),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


@pytest.mark.parametrize(
    "with_eval,pairing,kept",
    [(False, None, None), (True, None, "host"), (False, "batch", "live")],
)
def test_a_reference_is_kept_only_where_a_pass_needs_it(
    small_model, tiny_tokenizer, tmp_path, with_eval, pairing, kept
):
    extra = {} if pairing is None else {"kl_pairing": pairing}
    eval_dataset = make_kto_dataset(8, seed=2) if with_eval else None
    trainer = build(small_model, tiny_tokenizer, tmp_path, eval_dataset, **extra)
    # eval rows' KL rows are paired per batch: their reference runs at evaluation, so a copy stays in host memory
    assert (trainer._host_reference is not None) == (kept == "host")
    assert (trainer.ref_model is not None) == (kept == "live")


def test_a_model_object_stops_with_the_fix(small_model, tiny_tokenizer, tmp_path):
    trainer = build(small_model, tiny_tokenizer, tmp_path)
    assert trainer._host_reference is None and trainer.ref_model is None
    trainer.train()
    with pytest.raises(RuntimeError, match="Give this dataset as `eval_dataset` when building the trainer"):
        trainer.evaluate(make_kto_dataset(8, seed=3))


def test_a_model_path_reloads_the_same_reference(tiny_default, tmp_path):
    initial = tiny_default.load_model()
    trainer = build(str(tiny_default.model_dir), tiny_default.load_tokenizer(), tmp_path, learning_rate=1e-2)
    assert trainer._host_reference is None
    trainer.train()
    metrics = trainer.evaluate(make_kto_dataset(8, seed=3))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    reloaded = dict(trainer._host_reference.model.named_parameters())
    policy = dict(trainer.model.named_parameters())
    for name, p in initial.named_parameters():
        assert torch.equal(reloaded[name], p)  # the reference is the model as it was loaded
    assert any(not torch.equal(policy[n], p) for n, p in initial.named_parameters())  # the policy moved


def test_changed_files_stop_the_reload(tiny_default, small_model, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(tiny_default.model_dir, source)
    trainer = build(str(source), tiny_default.load_tokenizer(), tmp_path / "run")
    trainer.train()
    model = tiny_default.load_model()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(source)
    with pytest.raises(RuntimeError, match="is not the model whose log-probs were cached"):
        trainer.evaluate(make_kto_dataset(8, seed=3))
