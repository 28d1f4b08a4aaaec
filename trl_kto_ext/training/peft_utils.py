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


def keep_4bit_backward_on_cpu(model) -> int:
    """Keeps gradients flowing through 4-bit layers on CPU; returns the number of layers changed.

    bitsandbytes (0.50) on CPUs with AVX512-BF16 repacks a `Linear4bit` weight for fast inference the first time the
    layer runs in eval mode on an input without grad (a generation, a reference pass), and from then on runs it, in
    training too, through an op with no backward: the gradient stops at every 4-bit layer, silently (PyTorch only
    warns "may lead to silently incorrect behavior"), so LoRA adapters behind one (q/k/v behind o_proj, gate/up behind
    down_proj) never train. Measured on SmolLM2-135M, QLoRA on q_proj/v_proj: every adapter gradient None. This turns
    the repacking off for the layers of `model` and undoes it where it already happened."""
    if "bitsandbytes" not in sys.modules:
        return 0
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
        changed += 1
    return changed
