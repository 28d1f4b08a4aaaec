"""A field set after the config is built (`args.desirable_weight = 3.5`) is honoured at trainer start as if it had been
given to the constructor, with everything derived from it derived again, or refused with the constructor's message."""

import warnings

import pytest
from conftest import cpu_args

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset

# 20 desirable and 80 undesirable rows: auto loss aversion gives lambda_D = 80 / 20 = 4 (target 1).
DATA = make_kto_dataset(100, seed=0, desirable_ratio=0.2)


def _trainer(model, tokenizer, args):
    return KTOExtTrainer(model=model, args=args, train_dataset=DATA, processing_class=tokenizer)


def test_desirable_weight_set_after_construction_is_used_as_trl_does(small_model, tiny_tokenizer, tmp_path):
    from trl import KTOConfig

    trl_args = KTOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True)
    trl_args.desirable_weight = 3.5
    assert trl_args.desirable_weight == 3.5  # TRL's trainer reads the field as it is: the reference behaviour

    args = cpu_args(tmp_path)
    assert args.loss_aversion == "auto"
    args.desirable_weight = 3.5
    with pytest.warns(UserWarning, match=r"desirable_weight=3.5 .* so loss_aversion is 'manual'"):
        trainer = _trainer(small_model, tiny_tokenizer, args)
    assert trainer.loss_aversion.mode == "manual"
    assert (trainer.desirable_weight, trainer.undesirable_weight) == (3.5, 1.0)
    assert trainer.loss_aversion.ratio == pytest.approx(3.5 * 20 / (1.0 * 80))
    assert trainer.args is args and args.loss_aversion == "manual"


def test_undesirable_weight_set_after_construction_is_used(small_model, tiny_tokenizer, tmp_path):
    args = cpu_args(tmp_path)
    args.undesirable_weight = 0.25
    with pytest.warns(UserWarning, match="loss_aversion is 'manual'"):
        trainer = _trainer(small_model, tiny_tokenizer, args)
    assert (trainer.desirable_weight, trainer.undesirable_weight) == (1.0, 0.25)


def test_loss_aversion_target_and_mode_set_after_construction_are_used(small_model, tiny_tokenizer, tmp_path):
    args = cpu_args(tmp_path)
    args.loss_aversion_target = 4 / 3
    trainer = _trainer(small_model, tiny_tokenizer, args)
    assert trainer.desirable_weight == pytest.approx(4 / 3 * 80 / 20)

    args = cpu_args(tmp_path / "manual", loss_aversion="manual")  # weights 1, 1 taken as given
    args.loss_aversion = "auto"
    assert _trainer(small_model, tiny_tokenizer, args).desirable_weight == pytest.approx(4.0)


def test_manual_weights_given_at_construction_warn_once(small_model, tiny_tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="loss_aversion is 'manual'"):
        args = cpu_args(tmp_path, desirable_weight=2.0)
    args.beta = 0.2  # another field changed: the weights' message is not repeated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(small_model, tiny_tokenizer, args)
    assert not [w for w in caught if "loss_aversion is 'manual'" in str(w.message)]
    assert trainer.desirable_weight == 2.0 and trainer.beta == 0.2


def test_bf16_left_unset_then_turned_off_trains_in_float32(small_model, tiny_tokenizer, tmp_path):
    args = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", activation_checkpointing=False)
    assert args.bf16 and args.mixed_precision == "bf16"  # unset + use_cpu: bf16 (said at train start)
    args.bf16 = False
    trainer = _trainer(small_model, tiny_tokenizer, args)
    # transformers derives `mixed_precision` from bf16 at construction; it is derived again, not kept stale.
    assert args.mixed_precision == "no" and trainer.accelerator.mixed_precision == "no"
    assert not getattr(args, "bf16_from_default", False)  # no "bf16 left unset" line for a value the user set


def test_fp16_set_after_bf16_was_derived_turns_the_default_off(tmp_path):
    args = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.bf16  # derived: bf16 was left unset
    args.fp16 = True  # given to the constructor, this leaves bf16 off; left as is, both would be on
    args.refresh()
    assert (args.fp16, args.bf16, args.mixed_precision) == (True, False, "fp16")

    args = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to="none")
    args.fp16 = True  # bf16 set by the user too: refused with transformers' own message
    with pytest.raises(ValueError, match="At most one of fp16 and bf16"):
        args.refresh()


@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_checkpointing_turned_off_under_either_name(name, small_model, tiny_tokenizer, tmp_path):
    args = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1)
    assert args.activation_checkpointing and args.gradient_checkpointing  # TRL's default: on
    setattr(args, name, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' note on the old name
        trainer = _trainer(small_model, tiny_tokenizer, args)
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    trainer.train()
    assert not trainer.model.is_gradient_checkpointing


def test_eval_strategy_set_after_construction_derives_do_eval_and_eval_steps(tmp_path):
    args = KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, logging_steps=7)
    assert args.do_eval is False
    args.eval_strategy = "steps"
    args.refresh()
    assert args.do_eval is True and args.eval_steps == 7  # transformers: eval_steps falls back to logging_steps


def test_pin_memory_derived_again_and_set_values_kept(tmp_path):
    args = KTOExtConfig(output_dir=str(tmp_path), bf16=False)
    assert args.dataloader_pin_memory is False  # derived: no accelerator here to copy to
    args.dataloader_pin_memory = True
    assert args.refresh().dataloader_pin_memory is True  # the user's value, not the derived one
    args.use_cpu = True  # transformers turns pinning off with use_cpu, as it does at construction
    assert args.refresh().dataloader_pin_memory is False
    assert (
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, dataloader_pin_memory=True).dataloader_pin_memory is False
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("learning_rate", -1.0, "`learning_rate` must be a positive finite number, got -1.0."),
        ("beta", float("nan"), "`beta` must be a positive finite number, got nan."),
        ("per_device_train_batch_size", 0, "`per_device_train_batch_size` must be a whole number >= 1, got 0."),
        ("loss_aversion_target", 2.0, "`loss_aversion_target` = 2.0 is outside [1, 4/3]"),
        ("kl_pairing", "epoch", "`kl_pairing` must be 'batch' or 'dataset', got 'epoch'."),
        ("on_nonfinite_loss", "ignore", "`on_nonfinite_loss` must be 'raise' or 'skip', got 'ignore'."),
        ("train_sampling_strategy", "shuffled", "`train_sampling_strategy` must be one of"),
    ],
)
def test_bad_value_set_after_construction_is_refused_at_trainer_start(
    name, value, message, small_model, tiny_tokenizer, tmp_path
):
    args = cpu_args(tmp_path)
    setattr(args, name, value)
    with pytest.raises(ValueError) as info:
        _trainer(small_model, tiny_tokenizer, args)
    assert str(info.value).startswith(message)


def test_nothing_changed_nothing_rebuilt(tmp_path):
    args = cpu_args(tmp_path)
    before = dict(vars(args))
    assert args.refresh() is args
    assert vars(args) == before


def test_field_read_when_built_and_changed_on_the_trainer_is_refused_at_train(small_model, tiny_tokenizer, tmp_path):
    trainer = _trainer(small_model, tiny_tokenizer, cpu_args(tmp_path, max_steps=1))
    trainer.args.beta = 0.5  # TRL's trainer copied beta when it was built and would train with 0.1
    trainer.args.max_length = 32  # the small model's limit is 64: lowered to it when built
    with pytest.raises(ValueError) as info:
        trainer.train()
    assert str(info.value) == (
        "`beta` (0.1 -> 0.5), `max_length` (64 -> 32) set on the trainer's args after the trainer was built; the "
        "trainer read them when it was built. Set the value on the config before building the trainer (or build a "
        "new trainer)."
    )
    assert trainer.state.global_step == 0
    trainer.args.beta, trainer.args.max_length = 0.1, 64
    trainer.args.learning_rate = 5e-4  # read by the optimizer when training starts: honoured, not refused
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 5e-4


def test_a_config_saved_and_loaded_again_is_refreshed(tmp_path):
    import torch

    args = cpu_args(tmp_path)
    torch.save(args, tmp_path / "training_args.bin")  # as the Trainer saves it next to each checkpoint
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    loaded.desirable_weight = 2.0
    with pytest.warns(UserWarning, match="loss_aversion is 'manual'"):
        assert loaded.refresh().loss_aversion == "manual"
    del loaded.__dict__["_resolved"]  # saved by a version that kept no record: left as it is
    assert loaded.refresh() is loaded


def test_online_config_fields_set_later_are_checked_again(tmp_path):
    from trl_kto_ext import OnlineKTOConfig

    args = OnlineKTOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, num_generations=4)
    args.num_generations = 3  # 8 completions cannot be split into groups of 3
    with pytest.raises(
        ValueError, match=r"^`per_device_train_batch_size` \(8\) counts completions and must be a multiple"
    ):
        args.refresh()
    args.num_generations, args.temperature = 4, float("inf")
    with pytest.raises(ValueError, match=r"^`temperature` must be a positive finite number, got inf\.$"):
        args.refresh()
