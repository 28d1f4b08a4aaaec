"""GGUF files as trainable models: dequantized into a normal transformers model, so training ends in a normal save.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=...)`, with the `gguf` package) by dequantizing
its tensors, but the model it returns still carries a GGUF quantizer and `save_pretrained` refuses it ("The model is
quantized with gguf and is not serializable"): a run would train for hours and fail in `save_model`. The trainers
therefore load `model_init_kwargs={"gguf_file": ...}` through [`dequantize_gguf`] (a model built from the same config
without the quantizer, holding the dequantized weights; its tokenizer from the same file), and refuse, at start-up, a
model object already loaded from a GGUF file, naming the fix.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def require_gguf() -> None:
    from trl_kto_ext.compat import require

    try:
        require("gguf")
    except ImportError as err:
        raise ImportError(f"{err} (transformers reads GGUF files with it)") from None


def dequantize_gguf(folder: str | os.PathLike[str], gguf_file: str, dtype=None, **from_pretrained_kwargs):
    """(model, tokenizer) of `folder/gguf_file` as a normal transformers model: the dequantized weights copied into a
    model built from the GGUF's config without its `quantization_config`, so it trains and `save_pretrained` works.

    `dtype`: a torch dtype or its name (default float32). Other keyword arguments go to `from_pretrained` (e.g.
    `attn_implementation`). Raises ImportError without the `gguf` package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    dtype = torch.float32 if dtype in (None, "auto") else dtype
    kwargs = {k: v for k, v in from_pretrained_kwargs.items() if v is not None}
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # not on "meta": its rotary buffers are computed
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    return model.eval(), tokenizer


def is_gguf_loaded(model) -> bool:
    """Whether `model` (or the base model under PEFT) was loaded from a GGUF file by transformers (not saveable)."""
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    return str(getattr(method, "value", method)) == "gguf"


def resolve_gguf(model, args, trainer_kwargs: dict[str, Any]):
    """The trainer's model: `model` unchanged, or for a path with `args.model_init_kwargs["gguf_file"]` the
    dequantized model (the GGUF's tokenizer becomes `processing_class` when none is given). Returns (model, loaded
    from GGUF). Raises ValueError for a model object loaded from a GGUF file, or a GGUF file with k-bit loading."""
    init = args.model_init_kwargs if isinstance(args.model_init_kwargs, dict) else None
    if not isinstance(model, str):
        if is_gguf_loaded(model):
            raise ValueError(
                "The model was loaded from a GGUF file (`from_pretrained(..., gguf_file=...)`): transformers cannot "
                "save such a model, so save_model would fail after training. Pass the folder as `model` with "
                "`model_init_kwargs={'gguf_file': ...}` (the trainer loads it as a normal model), or convert it first: "
                "`model, tokenizer = trl_kto_ext.models.gguf.dequantize_gguf(folder, gguf_file)`."
            )
        return model, False
    if not init or not init.get("gguf_file"):
        return model, False
    if trainer_kwargs.get("quantization_config") is not None or init.get("quantization_config") is not None:
        raise ValueError(
            "A GGUF file cannot be loaded in 4 or 8 bits (load_in_4bit / load_in_8bit / quantization_config): its "
            "weights are dequantized to a float dtype. Drop the k-bit setting, or save the dequantized model "
            "(trl_kto_ext.models.gguf.dequantize_gguf) and load that folder in k-bit."
        )
    kwargs = {k: v for k, v in init.items() if k not in ("gguf_file", "device_map", "trust_remote_code", "revision")}
    dequantized, tokenizer = dequantize_gguf(model, init["gguf_file"], **kwargs)
    if trainer_kwargs.get("processing_class") is None:
        trainer_kwargs["processing_class"] = tokenizer
    if _main_process():
        print(
            f"Loaded {init['gguf_file']} dequantized to {dequantized.dtype}: it trains and saves as a normal "
            "transformers model (save_model writes safetensors, not GGUF).",
            file=sys.stderr,
            flush=True,
        )
    return dequantized, True


def _main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
