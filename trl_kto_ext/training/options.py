"""Inherited options that need an accelerator, a package or a model feature, checked up front with one line each.

TrainingArguments / KTOConfig accept these fields anywhere and fail later, deep in a library (an `AttributeError` at
set-up, an `ImportError` at the first step after the data and reference passes, a compiler error at the first
compiled forward). `check_config` runs in `KTOExtConfig.__post_init__`, before transformers sets up the devices;
`check_trainer` runs when `KTOExtTrainer` starts, before any data or model work. Options already refused in one line
by transformers (`tf32` without an Ampere GPU, `bf16` on CPU without `use_cpu`, a `report_to` logger that is not
installed) are left to it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import torch

# optim family (a name prefix) -> (module, pip name): transformers imports it only when it builds the optimizer, at
# the first step; a pip name with a "(...)" is not installable everywhere.
_OPTIMIZER_PACKAGES = {
    ("adamw_bnb", "adamw_8bit", "ademamix", "lion_", "paged_", "rmsprop_bnb", "galore_adamw_8bit"): (
        "bitsandbytes",
        "bitsandbytes",
    ),
    ("galore_",): ("galore_torch", "galore-torch"),
    ("apollo_",): ("apollo_torch", "apollo-torch"),
    ("lomo", "adalomo"): ("lomo_optim", "lomo-optim"),
    ("schedule_free_",): ("schedulefree", "schedulefree"),
    ("grokadamw",): ("grokadamw", "grokadamw"),
    ("stable_adamw",): ("optimi", "torch-optimi"),
    ("adamw_torch_4bit", "adamw_torch_8bit"): ("torchao", "torchao"),
    ("adamw_anyprecision",): ("torchdistx", "torchdistx (built from github.com/pytorch/torchdistx)"),
    ("adamw_torch_xla",): ("torch_xla", "torch_xla (XLA/TPU devices only)"),
    ("adamw_torch_npu_fused",): ("torch_npu", "torch_npu (Ascend NPUs only)"),
}
_FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def check_config(args) -> None:
    """Options that fail inside `TrainingArguments.__post_init__` itself (device set-up). Raises `ValueError`."""
    if args.deepspeed and not _installed("deepspeed"):
        raise ValueError(
            "deepspeed is set but the deepspeed package is not installed: `pip install deepspeed` (it needs a CUDA "
            "toolchain), or remove `deepspeed` from the config."
        )
    backend = getattr(args, "ddp_backend", None)
    if backend and not _launched_distributed():
        raise ValueError(
            f"ddp_backend={backend!r} sets up a multi-process run, but this process was started alone (no WORLD_SIZE "
            "in its environment). Launch with `torchrun --nproc_per_node N ...` (or `accelerate launch`), or remove "
            "ddp_backend."
        )
    if backend == "nccl" and (args.use_cpu or not torch.cuda.is_available()):
        raise ValueError(
            "ddp_backend='nccl' needs CUDA GPUs, and this run is on CPU: use ddp_backend='gloo' (or leave it unset)."
        )


def check_trainer(model, args, trainer_kwargs: dict) -> None:
    """Options that fail later in the run (set-up, first step, first compiled forward). Raises `ValueError`.

    Args:
        model: the model object or name given to the trainer; args: the resolved config (its `device` is set up);
        trainer_kwargs: the trainer's other keyword arguments (`peft_config`, `optimizers`, ...).
    """
    device = args.device.type
    if getattr(args, "activation_offloading", False) and device == "cpu":
        raise ValueError(
            "activation_offloading=True moves activations from an accelerator to host memory, but this run is on "
            "CPU (use_cpu=True or no GPU found): there is nothing to offload to. Set activation_offloading=False "
            "(activation_checkpointing saves memory on CPU)."
        )
    if args.use_liger_kernel and not _installed("liger_kernel"):
        raise ValueError(
            "use_liger_kernel=True needs the liger-kernel package, which is not installed: `pip install "
            "liger-kernel` (its Triton kernels need a GPU), or set use_liger_kernel=False."
        )
    if args.use_liger_kernel and device == "cpu":
        raise ValueError(
            "use_liger_kernel=True runs Triton GPU kernels, and this run is on CPU: set use_liger_kernel=False."
        )
    if args.torch_compile and device == "cpu" and (args.torch_compile_backend or "inductor") == "inductor":
        compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        if sys.platform != "win32" and shutil.which(compiler) is None:
            raise ValueError(
                f"torch_compile=True compiles C++ on CPU, but the compiler {compiler!r} was not found (set CXX to "
                "the compiler to use, e.g. CXX=clang++): install one, or set torch_compile=False."
            )
    _check_optimizer(args, trainer_kwargs)
    _check_model_init_kwargs(model, args, device)
    _check_activation_checkpointing(model, args)
    check_trainable(model, trainer_kwargs.get("peft_config"))


def check_trainable(model, peft_config) -> None:
    """Raises a `ValueError` when a model object has no trainable parameter and no adapters are to be added: every
    step would stop with "element 0 of tensors does not require grad" (or a CheckpointError under activation
    checkpointing). A quantized model without adapters is left to transformers' own message."""
    if isinstance(model, str) or peft_config is not None or not isinstance(model, torch.nn.Module):
        return
    if any(p.requires_grad for p in model.parameters()):
        return
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return
    if hasattr(model, "peft_config"):  # a PeftModel (or a model with adapters loaded onto it)
        raise ValueError(
            "The model has no trainable parameters: its LoRA adapter was loaded frozen (`PeftModel.from_pretrained` "
            "defaults to is_trainable=False). Load it with `PeftModel.from_pretrained(base, adapter_dir, "
            "is_trainable=True)` to train it."
        )
    raise ValueError(
        "The model has no trainable parameters (every parameter has requires_grad=False), so there is nothing to "
        "train. Unfreeze what should train (e.g. `model.requires_grad_(True)`), or pass `peft_config=LoraConfig(...)` "
        "to train adapters."
    )


def _check_optimizer(args, trainer_kwargs: dict) -> None:
    given = trainer_kwargs.get("optimizers") or (None, None)
    if given[0] is not None or trainer_kwargs.get("optimizer_cls_and_kwargs") is not None:
        return  # the user's optimizer: `optim` is not used
    optim = str(getattr(args.optim, "value", args.optim))
    for prefixes, (module, package) in _OPTIMIZER_PACKAGES.items():
        if optim.startswith(prefixes) and not _installed(module):
            fix = f"`pip install {package}`, or choose" if "(" not in package else "choose"
            raise ValueError(
                f"optim={optim!r} needs the {package} package, which is not installed: {fix} another optimizer "
                "(e.g. optim='adamw_torch')."
            )


def _check_model_init_kwargs(model, args, device: str) -> None:
    if not isinstance(model, str):
        return  # `model_init_kwargs` apply to a model loaded by name only
    kwargs = getattr(args, "model_init_kwargs", None) or {}
    if isinstance(kwargs, str):  # a command-line flag gives JSON
        try:
            kwargs = json.loads(kwargs)
        except ValueError:
            return  # TRL reports it when it reads the value
    if not isinstance(kwargs, dict):
        return
    attention = kwargs.get("attn_implementation")
    if attention in _FLASH_ATTENTION and device != "cuda":
        raise ValueError(
            f"attn_implementation={attention!r} runs on CUDA GPUs only, and this run is on {device!r}: use "
            "attn_implementation='sdpa' (or 'eager')."
        )
    device_map = kwargs.get("device_map")
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    for place in places:
        kind = place.type if isinstance(place, torch.device) else None
        if isinstance(place, str) and place.split(":")[0] in ("cuda", "cpu", "xpu", "mps", "npu", "hpu", "meta"):
            kind = place.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"model_init_kwargs device_map={device_map!r} places the model on CUDA, but no CUDA GPU is available "
                "here: remove device_map (the trainer places the model) or use device_map='cpu'."
            )


def _check_activation_checkpointing(model, args) -> None:
    if not (getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)):
        return
    if isinstance(model, str):
        model_class = _named_model_class(model, args)
    else:
        model_class = type(model.get_base_model()) if hasattr(model, "get_base_model") else type(model)
    if model_class is not None and getattr(model_class, "supports_gradient_checkpointing", True) is False:
        raise ValueError(
            f"{model_class.__name__} does not support activation checkpointing, which KTOConfig turns on by default: "
            "set activation_checkpointing=False (command line: --activation_checkpointing false)."
        )


def _named_model_class(name: str, args):
    """The causal-LM class transformers would load for `name`; None when it cannot be told without loading."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        init_kwargs = getattr(args, "model_init_kwargs", None) or {}
        config = AutoConfig.from_pretrained(name, revision=init_kwargs.get("revision"))
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception:  # remote code, an unknown architecture, no config readable: transformers decides when loading
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _launched_distributed() -> bool:
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ
