"""bitsandbytes' CPU inference repacking of 4-bit layers, kept off the models a trainer runs.

bitsandbytes (0.49+, on CPUs with AVX512-BF16) repacks a `Linear4bit` weight for a faster CPU kernel the first time the
layer runs in eval mode on an input without gradient (an evaluation, `generate`, a start-up check), and from then on
runs that kernel in training too. The kernel has no backward pass: torch warns "an autograd kernel was not registered
... This may lead to silently incorrect behavior", and no gradient flows back through the layer, so LoRA adapters
before it get none (measured here: after one eval-mode forward, 0 of 8 LoRA tensors of a 4-bit tiny Llama received a
gradient; 8 of 8 without it). The repacking also asserts that the layer's output size is a multiple of 32.
"""

from __future__ import annotations


def keep_4bit_layers_trainable(model, reference=None) -> None:
    """Turns bitsandbytes' CPU repacking off on every 4-bit layer of `model` and of `reference` (if given), so every
    later forward uses the kernels with a backward pass. Layers other than bitsandbytes' `Linear4bit` are untouched.

    Raises:
        ValueError: a layer of `model` was repacked already (it ran in eval mode before it reached the trainer).
            bitsandbytes' own inverse does not restore it exactly (measured: the loss of the tiny Llama moved by 0.87),
            so the model must be loaded again. A repacked `reference` is left as it is (it needs no gradient).
    """
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
