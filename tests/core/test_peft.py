"""LoRA with KTOExtTrainer: no reference copy, reference = base with adapters off, adapter-only saving, YAML mapping."""

import math

import pytest
import torch
import yaml
from conftest import collated_batch, cpu_args, logged_losses, sequence_logps
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset

N_ROWS = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model: a second thread only waits


@pytest.fixture(scope="module")
def model_dir(tiny_default):
    return str(tiny_default.model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def base_model(model_dir):
    """A freshly loaded base model that no trainer ever touches."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def lora_config(**overrides):
    values = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    values.update(overrides)
    return LoraConfig(**values)


def make_args(output_dir, **overrides):
    return cpu_args(output_dir, **{"max_steps": 4, **overrides})


def distinct_parameter_numel(*modules):
    """Number of parameter values held in memory: parameters sharing storage (tied, or the same model twice) count
    once."""
    storages = {}
    for module in modules:
        if module is None:
            continue
        for param in module.parameters():
            storages[param.data_ptr()] = max(storages.get(param.data_ptr(), 0), param.numel())
    return sum(storages.values())


def adapter_numel(model):
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def assert_one_copy_of_base(trainer, base_model):
    assert trainer.ref_model is None
    held = distinct_parameter_numel(trainer.model, trainer.ref_model, trainer.accelerator.unwrap_model(trainer.model))
    base = sum(p.numel() for p in base_model.parameters())
    assert adapter_numel(trainer.model) > 0
    assert held == base + adapter_numel(trainer.model)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def assert_reference_is_base(trainer, base_model, batch):
    """The trainer's reference path gives the base model's log-probs, on target and KL rows, while the policy (with
    its trained adapter) does not; and the adapters are active again afterwards."""
    trainer.model.eval()
    live = {k: v for k, v in batch.items() if k not in ("ref_logps", "ref_KL_logps")}  # the forward, not a cache
    expected = sequence_logps(base_model, batch)
    torch.testing.assert_close(trainer._reference_target_logps(live), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        trainer._reference_kl_logps(live), sequence_logps(base_model, batch, prefix="KL_"), rtol=1e-5, atol=1e-4
    )
    policy = sequence_logps(trainer.model, batch)
    assert (policy - expected).abs().max() > 1e-3, "the adapter did not train: the check above would be vacuous"
    torch.testing.assert_close(sequence_logps(trainer.model, batch), policy)  # adapters re-enabled after the reference
    return expected


@pytest.mark.parametrize(
    "precompute, kl_pairing",
    [(False, "batch"), (True, "batch"), (True, "dataset")],
    ids=["live-ref", "precomputed-ref", "precomputed-ref-and-kl"],
)
def test_lora_from_peft_config(tmp_path, model_dir, tokenizer, base_model, precompute, kl_pairing):
    args = make_args(tmp_path, precompute_ref_log_probs=precompute, kl_pairing=kl_pairing)
    assert args.train_sampling_strategy == "random"  # shuffled sampler, the default
    trainer = KTOExtTrainer(
        model_dir,
        args=args,
        train_dataset=make_kto_dataset(N_ROWS, seed=1),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert isinstance(trainer.model, PeftModel)
    trainer.train()

    losses = logged_losses(trainer)
    assert len(losses) == args.max_steps and all(math.isfinite(x) for x in losses)
    assert_one_copy_of_base(trainer, base_model)
    batch = collated_batch(trainer)
    expected = assert_reference_is_base(trainer, base_model, batch)
    if precompute:
        # The cached reference log-probs (targets; KL rows too when their pairing is fixed over the dataset) were
        # computed with the adapters off as well: they are the base model's.
        columns = trainer.train_dataset.column_names
        assert "ref_logps" in columns and ("ref_KL_logps" in columns) == (kl_pairing == "dataset")
        assert "ref_logps" in batch
        torch.testing.assert_close(trainer._reference_target_logps(batch), expected, rtol=1e-5, atol=1e-4)
        if kl_pairing == "dataset":
            assert "ref_KL_logps" in batch
            torch.testing.assert_close(
                trainer._reference_kl_logps(batch), sequence_logps(base_model, batch, "KL_"), rtol=1e-5, atol=1e-4
            )


def test_lora_on_wrapped_peft_model(tmp_path, model_dir, tokenizer, base_model):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config())
    trainer = KTOExtTrainer(
        model, args=make_args(tmp_path), train_dataset=make_kto_dataset(N_ROWS, seed=2), processing_class=tokenizer
    )
    assert trainer.model is model
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".default." in n}
    trainer.train()

    # The frozen copy stays frozen and equal to the adapter as given.
    ref_params = {n: p for n, p in model.named_parameters() if ".ref." in n}
    assert ref_params and not any(p.requires_grad for p in ref_params.values())
    for name, param in ref_params.items():
        torch.testing.assert_close(param, initial[name.replace(".ref.", ".default.")], rtol=0, atol=0)

    assert all(math.isfinite(x) for x in logged_losses(trainer))
    # TRL freezes a copy of the adapter as it was given ("ref"): a fresh adapter is the identity, so the reference is
    # the base model; it adds adapter-sized weights only.
    assert_one_copy_of_base(trainer, base_model)
    assert_reference_is_base(trainer, base_model, collated_batch(trainer))


def test_saves_adapter_only_and_merges(tmp_path, model_dir, tokenizer, base_model):
    trainer = KTOExtTrainer(
        model_dir,
        args=make_args(tmp_path / "run"),
        train_dataset=make_kto_dataset(N_ROWS, seed=3),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))

    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    base_bytes = sum(p.numel() * p.element_size() for p in base_model.parameters())
    assert (out / "adapter_model.safetensors").stat().st_size < base_bytes / 2

    batch = collated_batch(trainer)
    trainer.model.eval()
    trained = sequence_logps(trainer.model, batch)

    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(sequence_logps(reloaded, batch), trained, rtol=1e-5, atol=1e-4)
    merged = reloaded.merge_and_unload()
    assert not isinstance(merged, PeftModel) and not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(sequence_logps(merged, batch), trained, rtol=1e-5, atol=1e-4)

    onto_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
    torch.testing.assert_close(sequence_logps(onto_base, batch), trained, rtol=1e-5, atol=1e-4)
    # A merged model saves as a plain checkpoint that loads without peft.
    merged.save_pretrained(tmp_path / "merged")
    standalone = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(sequence_logps(standalone, batch), trained, rtol=1e-5, atol=1e-4)
    assert (sequence_logps(base_model, batch) - trained).abs().max() > 1e-3


def test_yaml_model_config_maps_to_lora(tmp_path, model_dir, tokenizer, base_model):
    config = {
        "model_name_or_path": model_dir,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj"],
        "output_dir": str(tmp_path / "run"),
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "disable_tqdm": True,
    }
    path = tmp_path / "kto_lora.yaml"
    path.write_text(yaml.safe_dump(config))
    training_args, model_args = TrlParser((KTOExtConfig, ModelConfig)).parse_args_and_config(
        args=["--config", str(path)]
    )

    peft_config = get_peft_config(model_args)
    assert isinstance(peft_config, LoraConfig)
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (4, 8, 0.0)
    assert set(peft_config.target_modules) == {"q_proj", "v_proj"}
    trainer = KTOExtTrainer(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=make_kto_dataset(N_ROWS, seed=4),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()

    assert all(math.isfinite(x) for x in logged_losses(trainer))
    adapted = {name.split(".")[-4] for name, _ in trainer.model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "v_proj"}
    assert all(m.r["default"] == 4 for m in trainer.model.modules() if hasattr(m, "lora_A") and m.lora_A)
    assert_one_copy_of_base(trainer, base_model)
    # use_peft: false gives no LoRA config: full fine-tuning.
    assert get_peft_config(ModelConfig(model_name_or_path=model_dir, use_peft=False)) is None
