"""Inherited options that need an accelerator, a package or a model feature: one line up front, naming the fix."""

import importlib.util
import math

import pytest
import torch
from conftest import cpu_args, logged_losses
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.models.tiny import build_model, make_kto_dataset


def installed(module):
    return importlib.util.find_spec(module) is not None


def trainer_for(model, tokenizer, tmp_path, **overrides):
    return KTOExtTrainer(
        model, args=cpu_args(tmp_path, max_steps=1, **overrides), train_dataset=make_kto_dataset(8, seed=1),
        processing_class=tokenizer,
    )  # fmt: skip


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_activation_offloading_on_cpu(small_model, tiny_tokenizer, tmp_path):
    """TRL: `AttributeError: 'NoneType' object has no attribute 'type'` from its offloading helper."""
    with pytest.raises(ValueError) as error:
        trainer_for(small_model, tiny_tokenizer, tmp_path, activation_offloading=True)
    assert one_line(error) == (
        "activation_offloading=True moves activations from an accelerator to host memory, but this run is on CPU "
        "(use_cpu=True or no GPU found): there is nothing to offload to. Set activation_offloading=False "
        "(activation_checkpointing saves memory on CPU)."
    )


def test_liger_kernel(small_model, tiny_tokenizer, tmp_path):
    """transformers raises its ImportError only when training starts (after the data and reference passes)."""
    with pytest.raises(ValueError) as error:
        trainer_for(small_model, tiny_tokenizer, tmp_path, use_liger_kernel=True)
    if installed("liger_kernel"):
        assert one_line(error).startswith("use_liger_kernel=True runs Triton GPU kernels, and this run is on CPU")
    else:
        assert one_line(error) == (
            "use_liger_kernel=True needs the liger-kernel package, which is not installed: `pip install liger-kernel` "
            "(its Triton kernels need a GPU), or set use_liger_kernel=False."
        )


OPTIMIZERS = [
    ("galore_adamw", "galore_torch", "galore-torch"),
    ("apollo_adamw", "apollo_torch", "apollo-torch"),
    ("lomo", "lomo_optim", "lomo-optim"),
    ("adalomo", "lomo_optim", "lomo-optim"),
    ("schedule_free_adamw", "schedulefree", "schedulefree"),
    ("grokadamw", "grokadamw", "grokadamw"),
    ("stable_adamw", "optimi", "torch-optimi"),
    ("adamw_torch_4bit", "torchao", "torchao"),
    ("adamw_torch_8bit", "torchao", "torchao"),
]


@pytest.mark.parametrize("optim,module,package", OPTIMIZERS)
def test_optimizer_whose_package_is_missing(small_model, tiny_tokenizer, tmp_path, optim, module, package):
    """transformers imports the optimizer's package at the first step; here the trainer stops before set-up."""
    if installed(module):
        pytest.skip(f"{module} is installed")
    with pytest.raises(ValueError) as error:
        trainer_for(small_model, tiny_tokenizer, tmp_path, optim=optim, optim_target_modules=["q_proj"])
    assert one_line(error) == (
        f"optim={optim!r} needs the {package} package, which is not installed: `pip install {package}`, or choose "
        "another optimizer (e.g. optim='adamw_torch')."
    )


@pytest.mark.parametrize("optim,module", [("adamw_torch_xla", "torch_xla"), ("adamw_torch_npu_fused", "torch_npu")])
def test_optimizer_for_another_device(small_model, tiny_tokenizer, tmp_path, optim, module):
    if installed(module):
        pytest.skip(f"{module} is installed")
    with pytest.raises(ValueError, match=rf"optim='{optim}' needs the {module} \(.* only\) package, which is not "
                       r"installed: choose another optimizer \(e.g. optim='adamw_torch'\)\.$"):  # fmt: skip
        trainer_for(small_model, tiny_tokenizer, tmp_path, optim=optim)


def test_optimizer_given_to_the_trainer_is_not_checked(small_model, tiny_tokenizer, tmp_path):
    """`optim` is unused when the trainer gets an optimizer: a missing package for it is no reason to stop."""
    if installed("optimi"):
        pytest.skip("optimi is installed")
    optimizer = torch.optim.SGD(small_model.parameters(), lr=1e-3)
    trainer = KTOExtTrainer(
        small_model, args=cpu_args(tmp_path, max_steps=1, optim="stable_adamw"), train_dataset=make_kto_dataset(8, seed=1),
        processing_class=tiny_tokenizer, optimizers=(optimizer, None),
    )  # fmt: skip
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer  # accelerate's wrapper around the given optimizer


def test_bitsandbytes_optimizer_trains_on_cpu(small_model, tiny_tokenizer, tmp_path):
    """Installed and supported on CPU: nothing to refuse."""
    pytest.importorskip("bitsandbytes")
    trainer = trainer_for(small_model, tiny_tokenizer, tmp_path, optim="paged_adamw_8bit")
    trainer.train()
    assert all(math.isfinite(x) for x in logged_losses(trainer))


def test_torch_compile_without_a_compiler(small_model, tiny_tokenizer, tmp_path, monkeypatch):
    """Inductor compiles C++ on CPU; without a compiler it fails at the first compiled forward."""
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ValueError) as error:
        trainer_for(small_model, tiny_tokenizer, tmp_path, torch_compile=True)
    assert one_line(error) == (
        "torch_compile=True compiles C++ on CPU, but the compiler 'no-such-c++-compiler' was not found (set CXX to "
        "the compiler to use, e.g. CXX=clang++): install one, or set torch_compile=False."
    )


def test_deepspeed_without_the_package(tmp_path):
    """transformers: `PackageNotFoundError: No package metadata was found for The 'deepspeed>=0.9.3' distribution
    ...` while building the config."""
    if installed("deepspeed"):
        pytest.skip("deepspeed is installed")
    with pytest.raises(ValueError) as error:
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, deepspeed={"zero_optimization": {"stage": 2}})
    assert one_line(error) == (
        "deepspeed is set but the deepspeed package is not installed: `pip install deepspeed` (it needs a CUDA "
        "toolchain), or remove `deepspeed` from the config."
    )


def test_ddp_backend_in_a_process_started_alone(tmp_path, monkeypatch):
    """accelerate: `ValueError: Default process group has not been initialized` while building the config."""
    for name in ("WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError) as error:
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, ddp_backend="gloo")
    assert one_line(error) == (
        "ddp_backend='gloo' sets up a multi-process run, but this process was started alone (no WORLD_SIZE in its "
        "environment). Launch with `torchrun --nproc_per_node N ...` (or `accelerate launch`), or remove ddp_backend."
    )


def test_nccl_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as error:
        KTOExtConfig(output_dir=str(tmp_path), use_cpu=True, ddp_backend="nccl")
    assert one_line(error) == (
        "ddp_backend='nccl' needs CUDA GPUs, and this run is on CPU: use ddp_backend='gloo' (or leave it unset)."
    )


@pytest.mark.parametrize("attention", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_on_cpu(tiny_default, tmp_path, attention):
    """transformers: "the package for FlashAttention2 doesn't seem to be installed", which installing cannot fix on
    a machine without a CUDA GPU."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_default.model_dir)
    with pytest.raises(ValueError) as error:
        trainer_for(
            str(tiny_default.model_dir), tokenizer, tmp_path, model_init_kwargs={"attn_implementation": attention}
        )
    assert one_line(error) == (
        f"attn_implementation={attention!r} runs on CUDA GPUs only, and this run is on 'cpu': use "
        "attn_implementation='sdpa' (or 'eager')."
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available")
def test_device_map_on_a_missing_gpu(tiny_default, tmp_path):
    """torch: `AssertionError: Torch not compiled with CUDA enabled` while loading."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_default.model_dir)
    with pytest.raises(ValueError) as error:
        trainer_for(
            str(tiny_default.model_dir), tokenizer, tmp_path, model_init_kwargs='{"device_map": "cuda:0"}'
        )  # a command-line flag gives JSON
    assert one_line(error) == (
        "model_init_kwargs device_map='cuda:0' places the model on CUDA, but no CUDA GPU is available here: remove "
        "device_map (the trainer places the model) or use device_map='cpu'."
    )


class _NoCheckpointing(LlamaForCausalLM):
    supports_gradient_checkpointing = False


def test_model_without_activation_checkpointing(small_model, tiny_tokenizer, tmp_path):
    """KTOConfig turns activation checkpointing on by default; transformers' message does not say how to turn it
    off. With it off, the same model trains."""
    model = _NoCheckpointing(small_model.config)
    with pytest.raises(ValueError) as error:
        trainer_for(model, tiny_tokenizer, tmp_path / "on", activation_checkpointing=True)
    assert one_line(error) == (
        "_NoCheckpointing does not support activation checkpointing, which KTOConfig turns on by default: set "
        "activation_checkpointing=False (command line: --activation_checkpointing false)."
    )
    trainer = trainer_for(model, tiny_tokenizer, tmp_path / "off", activation_checkpointing=False)
    trainer.train()
    assert all(math.isfinite(x) for x in logged_losses(trainer))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(tf32=True), "--tf32 requires Ampere or a newer GPU arch, cuda>=11 and torch>=1.7"),
        (
            dict(bf16=True, use_cpu=False),
            "Your setup doesn't support bf16/gpu. You need to assign use_cpu if you want to train the model on CPU.",
        ),
    ],
)
def test_options_transformers_refuses_in_one_line(tmp_path, overrides, message):
    """Left to transformers: its message is already one line with the fix (on a machine without a CUDA GPU)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available")
    with pytest.raises(ValueError) as error:
        KTOExtConfig(output_dir=str(tmp_path), **{"use_cpu": True, **overrides})
    assert one_line(error) == message


# ------------------------------------------------------------------------------------ a model with nothing to train
def _saved_adapter(small_model, path):
    torch.manual_seed(0)
    peft_model = get_peft_model(small_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(path)
    return peft_model.unload()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_adapter_reloaded_frozen(small_model, tiny_tokenizer, tmp_path, checkpointing):
    """`PeftModel.from_pretrained(base, dir)` loads the adapter frozen (is_trainable=False): step 1 would stop with
    "element 0 of tensors does not require grad" (a CheckpointError under activation checkpointing). The trainer
    names the cause before training; reloaded with is_trainable=True, the same adapter trains."""
    base = _saved_adapter(small_model, tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError) as error:
        trainer_for(frozen, tiny_tokenizer, tmp_path / "frozen", activation_checkpointing=checkpointing)
    assert one_line(error) == (
        "The model has no trainable parameters: its LoRA adapter was loaded frozen (`PeftModel.from_pretrained` "
        "defaults to is_trainable=False). Load it with `PeftModel.from_pretrained(base, adapter_dir, "
        "is_trainable=True)` to train it."
    )
    trainable = PeftModel.from_pretrained(frozen.unload(), tmp_path / "adapter", is_trainable=True)
    trainer = trainer_for(trainable, tiny_tokenizer, tmp_path / "trainable", activation_checkpointing=checkpointing)
    trainer.train()
    assert len(logged_losses(trainer)) == 1 and math.isfinite(logged_losses(trainer)[0])


def test_fully_frozen_model(tiny_tokenizer, tmp_path):
    model = build_model(tiny_tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model.requires_grad_(False)
    with pytest.raises(ValueError) as error:
        trainer_for(model, tiny_tokenizer, tmp_path)
    assert one_line(error) == (
        "The model has no trainable parameters (every parameter has requires_grad=False), so there is nothing to "
        "train. Unfreeze what should train (e.g. `model.requires_grad_(True)`), or pass `peft_config=LoraConfig(...)` "
        "to train adapters."
    )
