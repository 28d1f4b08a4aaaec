"""LoRA / QLoRA helpers: bitsandbytes imported only when k-bit is asked for, and a fail-fast check of its backend."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

_LORA_HINT = (
    "To train without quantization, run plain LoRA instead: drop `quantization_config` (YAML: set `load_in_4bit: "
    "false` and `load_in_8bit: false`) and keep `peft_config=LoraConfig(...)` (YAML: `use_peft: true`); the "
    "reference model is then the full-precision base with the adapters disabled."
)


def _kbit_error(device_type: str, reason: str) -> RuntimeError:
    return RuntimeError(
        f"QLoRA / k-bit loading (load_in_4bit / load_in_8bit) needs a bitsandbytes backend for the "
        f"'{device_type}' device, but {reason}. Install a bitsandbytes build that supports '{device_type}' "
        f"(see https://huggingface.co/docs/bitsandbytes/main/en/installation), or train on a device it supports. "
        f"{_LORA_HINT}"
    )


def check_kbit_backend(device_type: str) -> None:
    """Raises a `RuntimeError` that says what to do when bitsandbytes cannot run 4-bit layers on `device_type`.

    Call it before loading a model with a `BitsAndBytesConfig`, so that the user learns about a missing backend
    before the (possibly long) download and load, not from an error deep inside the first forward pass.

    bitsandbytes (>= 0.45) registers its kernels as `torch.library` ops per device (`bitsandbytes.backends.*`) and
    falls back to plain PyTorch implementations where it has them; a build whose native library does not match the
    device only fails when a kernel is first called. So besides importing the package and checking
    `bitsandbytes.supported_torch_devices`, this runs a 4-bit NF4 quantize / dequantize round trip (with double
    quantization, as QLoRA uses) and a 4-bit matmul on a tiny tensor on the device.

    Args:
        device_type: `"cpu"`, `"cuda"`, `"xpu"`, ... (a device string such as `"cuda:0"` is accepted too).
    """
    import torch

    device = torch.device(device_type)
    name = device.type
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional
    except Exception as err:  # ImportError, or a backend entry point that failed to load
        raise _kbit_error(name, f"`import bitsandbytes` failed ({type(err).__name__}: {err})") from err

    supported = getattr(bnb, "supported_torch_devices", None)
    if supported is not None and name not in supported:
        raise _kbit_error(
            name, f"bitsandbytes {getattr(bnb, '__version__', '?')} supports only {sorted(supported)} devices"
        )
    try:
        # One 64-value block: the smallest input every backend accepts, with a known exact round trip.
        weight = torch.ones(1, 64, dtype=torch.float32, device=device)
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        restored = bnb_functional.dequantize_4bit(packed, state)
        out = bnb.matmul_4bit(torch.ones(1, 64, dtype=torch.float32, device=device), packed.t(), quant_state=state)
        synchronize = getattr(getattr(torch, device.type, None), "synchronize", None)
        if device.type != "cpu" and synchronize is not None:
            synchronize()  # asynchronous devices report kernel failures here
    except Exception as err:
        raise _kbit_error(
            name, f"a 4-bit test on '{name}' failed ({type(err).__name__}: {str(err).strip()[:500]})"
        ) from err
    if not torch.allclose(restored.float().cpu(), weight.cpu()) or not torch.allclose(
        out.float().cpu(), torch.full((1, 1), 64.0), rtol=1e-2
    ):
        raise _kbit_error(name, f"a 4-bit quantize/dequantize test on '{name}' returned wrong values")


def asks_for_kbit(quantization_config, model_init_kwargs) -> bool:
    """Whether a quantization config (object or dict, given directly or in model_init_kwargs) asks for 4/8-bit."""
    configs = [quantization_config, (model_init_kwargs or {}).get("quantization_config")]
    for config in configs:
        values = config if isinstance(config, dict) else vars(config) if config is not None else {}
        if any(values.get(key) for key in ("load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit")):
            return True
    return False


@contextlib.contextmanager
def without_bitsandbytes() -> Iterator[None]:
    """Imports inside the block see bitsandbytes as not installed; the process is as before once it exits.

    peft imports bitsandbytes whenever it is installed, and transformers' `TrainingArguments` imports peft, so merely
    building a config costs the bitsandbytes import (~1 s) and its CPU backend logs a "Failed to load CPU
    gemm_4bit_forward from kernels-community" warning. Wrap the imports of a run that asks for no 4/8-bit in this:
    `import bitsandbytes` raises ImportError inside (a `None` entry in `sys.modules`, Python's documented way), and
    on exit the entry is removed and peft's cached `is_bnb_available` answers are cleared, so a later QLoRA in the
    same process imports bitsandbytes normally. Does nothing when bitsandbytes is already imported.
    """
    if "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        peft_imports = sys.modules.get("peft.import_utils")
        for name in ("is_bnb_available", "is_bnb_4bit_available"):
            with contextlib.suppress(AttributeError):
                getattr(peft_imports, name).cache_clear()


def check_adapters_off_reference(model, ref_model) -> None:
    """Raises a `ValueError` when the reference is the PEFT model with its adapters off (no `ref_model`) but some
    trainable parameter is not an adapter's: training would change the reference too, so z0 and the rewards would be
    measured against a moving model (e.g. LoRA `bias="all"` or `"lora_only"` trains the base layers' biases, which
    disabling the adapters keeps). A parameter belongs to an adapter when its name has the adapter's name as a component
    (`...lora_A.default.weight`, `...modules_to_save.default.weight`)."""
    adapters = set(getattr(model, "peft_config", None) or ()) if ref_model is None else set()
    outside = [n for n, p in model.named_parameters() if p.requires_grad and not adapters & set(n.split("."))]
    if adapters and outside:
        raise ValueError(
            f"{len(outside)} trainable parameters are not part of the adapters (first: {outside[0]}), and the "
            "reference is this model with its adapters disabled, which keeps them: the reference would move with "
            "training. Train adapters only: LoraConfig(bias='none') (the default), or freeze those parameters "
            "(requires_grad_(False)); to train base weights too, train without peft_config."
        )
