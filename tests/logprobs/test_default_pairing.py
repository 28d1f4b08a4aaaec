"""kl_pairing left unset: "dataset" with precompute_ref_log_probs (a cached step runs no reference forward), "batch"
otherwise; the start line says which pairing is used and why."""

import pytest
from conftest import cpu_args
from test_fast_path import odd_length_dataset

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.report.start import pairing_line


@pytest.mark.parametrize(
    "given,precompute,resolved,from_default",
    [
        (None, False, "batch", True),
        (None, True, "dataset", True),
        ("batch", False, "batch", False),
        ("batch", True, "batch", False),
        ("dataset", False, "dataset", False),
        ("dataset", True, "dataset", False),
    ],
)
def test_resolved_pairing(tmp_path, given, precompute, resolved, from_default):
    extra = {} if given is None else {"kl_pairing": given}
    args = cpu_args(tmp_path, precompute_ref_log_probs=precompute, **extra)
    assert (args.kl_pairing, args.kl_pairing_from_default) == (resolved, from_default)


def test_pairing_follows_precompute_set_after_construction(tmp_path):
    args = cpu_args(tmp_path)
    assert args.kl_pairing == "batch"
    args.precompute_ref_log_probs = True
    assert args.refresh().kl_pairing == "dataset"
    args.kl_pairing = "batch"  # set by the user: kept
    assert args.refresh().kl_pairing == "batch" and not args.kl_pairing_from_default


def test_online_config_keeps_batch_pairing(tmp_path):
    from trl_kto_ext import OnlineKTOConfig

    assert OnlineKTOConfig(output_dir=str(tmp_path), use_cpu=True).kl_pairing == "batch"
    with pytest.raises(ValueError, match="must be 'batch'"):
        OnlineKTOConfig(output_dir=str(tmp_path), use_cpu=True, kl_pairing="dataset")


def test_bad_pairing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'batch' or 'dataset'"):
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, kl_pairing="rows")


def count_reference_forwards(trainer) -> list:
    """Forward calls of every module that can serve as the reference (a live `ref_model`, the host copy)."""
    calls = []
    for ref in (trainer.ref_model, trainer._host_reference and trainer._host_reference.model):
        if ref is not None:
            ref.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("given,per_step", [(None, False), ("batch", True)])
def test_cached_step_runs_no_reference_forward(small_model, tiny_tokenizer, tmp_path, capsys, given, per_step):
    extra = {} if given is None else {"kl_pairing": given}
    args = cpu_args(
        tmp_path, precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache"), max_steps=2, **extra
    )
    trainer = KTOExtTrainer(
        model=small_model, args=args, train_dataset=odd_length_dataset(16, seed=2), processing_class=tiny_tokenizer
    )
    calls = count_reference_forwards(trainer)
    policy_calls = []
    trainer.model.register_forward_hook(lambda *_: policy_calls.append(1))
    trainer.train()
    assert policy_calls  # the counting hooks work: the policy ran
    assert bool(calls) == per_step  # "dataset" (the resolved default): 0 reference forwards; "batch": some
    assert ("ref_KL_logps" in trainer.train_dataset.column_names) != per_step
    out = capsys.readouterr().out
    if per_step:
        assert "KL pairing 'batch' (set)" in out and "a reference pass per step remains" in out
    else:
        assert "KL pairing 'dataset' (kl_pairing unset, precompute_ref_log_probs=True)" in out
        assert "no reference forward" in out


def test_start_line_is_quiet_for_the_plain_default(tmp_path):
    assert pairing_line(cpu_args(tmp_path)) is None
    assert "still runs on every step" in pairing_line(cpu_args(tmp_path, kl_pairing="dataset"))
