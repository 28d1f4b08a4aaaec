"""bitsandbytes' in-place changes to 4-bit layers, kept off the models a trainer runs: the CPU repacking and the bias cast.

Repacking: bitsandbytes (0.49+, on CPUs with AVX512-BF16) repacks a `Linear4bit` weight for a faster CPU kernel the first time the
layer runs in eval mode on an input without gradient (an evaluation, `generate`, a start-up check), and from then on
runs that kernel in training too. The kernel has no backward pass: torch warns "an autograd kernel was not registered
... This may lead to silently incorrect behavior", and no gradient flows back through the layer, so LoRA adapters
before it get none (measured here: after one eval-mode forward, 0 of 8 LoRA tensors of a 4-bit tiny Llama received a
gradient; 8 of 8 without it). The repacking also asserts that the layer's output size is a multiple of 32.

Bias cast: bitsandbytes (0.50) rounds a `Linear4bit` layer's bias to the compute dtype in place (`bias.data = ...`) at
every forward, on every device, so the frozen base model of a QLoRA run changes with its first step (a float32 bias
loaded with `bnb_4bit_compute_dtype=float16` is saved as float16). The layer computes with that rounded copy either way;
the trainer keeps the loaded bias in the parameter.
"""

from __future__ import annotations

import sys

import torch


def keep_4bit_layers_trainable(model, reference=None) -> None:
    """Turns bitsandbytes' CPU repacking off on every 4-bit layer of `model` and of `reference` (if given), so every
    later forward uses the kernels with a backward pass, and keeps each such layer's loaded bias in its parameter
    (bitsandbytes' forward still computes with the compute-dtype copy). Layers other than bitsandbytes' `Linear4bit`
    are untouched.

    Raises:
        ValueError: a layer of `model` was repacked already (it ran in eval mode before it reached the trainer).
            bitsandbytes' own inverse does not restore it exactly (measured: the loss of the tiny Llama moved by 0.87),
            so the model must be loaded again. A repacked `reference` is left as it is (it needs no gradient).
    """
    for m in (model, reference):
        _keep_biases(m)
    _repacking_off(reference)
    repacked = _repacking_off(model)
    if repacked:
        raise ValueError(
            f"{len(repacked)} 4-bit layers of the model (first: {repacked[0]}) were repacked by bitsandbytes for its "
            "CPU inference kernel, which it does the first time a 4-bit layer runs in eval mode (generate, evaluate). "
            "That kernel has no backward pass, so training would give the layers before it no gradient, and the "
            "repacking cannot be undone exactly. Load the model again and pass it to the trainer before running it "
            "(the trainer keeps the repacking off from then on, evaluation and generation included)."
        )


def _repacking_off(model) -> list[str]:
    """Names of the layers of `model` already repacked; turns the repacking off on all its 4-bit layers."""
    repacked = []
    for name, module in model.named_modules() if model is not None else ():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                repacked.append(name)
    return repacked


def _keep_biases(model) -> None:
    """Hooks on every bias-carrying `Linear4bit` of `model`: the bias tensor before a forward is put back after it."""
    bnb = sys.modules.get("bitsandbytes")  # a model with 4-bit layers has imported it
    if model is None or bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.bias is not None and not hasattr(module, _KEPT):
            setattr(module, _KEPT, None)
            module.register_forward_pre_hook(_hold_bias)
            module.register_forward_hook(_put_bias_back)


_KEPT = "_trl_kto_ext_loaded_bias"


def _hold_bias(module, args) -> None:
    frozen = not module.bias.requires_grad  # a trained bias (LoRA bias="all") keeps bitsandbytes' own handling
    setattr(module, _KEPT, module.bias.data if frozen else None)


def _put_bias_back(module, args, output) -> None:
    kept = getattr(module, _KEPT)
    if kept is not None and module.bias.data is not kept:
        with torch.no_grad():
            module.bias.data = kept
    setattr(module, _KEPT, None)
