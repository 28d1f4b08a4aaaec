"""The true reference of a full fine-tune whose reference log-probs are cached: a frozen copy kept in host memory."""

from __future__ import annotations

import contextlib
import copy
import itertools

import torch
from accelerate.utils import is_peft_model


def host_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of `model` whose parameters and buffers live in host (CPU) memory.

    Each tensor is copied straight to the CPU, so making the copy never holds a second set of weights on the
    accelerator. Forwards that TRL's fused LM head set on the instances are dropped (a deep copy would keep closures
    over the original's forward, i.e. compute with the trained weights); the caller adds a fused head of its own.
    """
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in memo:
            cpu = tensor.detach().to("cpu", copy=True)
            memo[id(tensor)] = (
                torch.nn.Parameter(cpu, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else cpu
            )
    return _runs_own_weights(copy.deepcopy(model, memo)).eval().requires_grad_(False)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of `model` that runs its own weights (on the devices of the original).

    TRL's fused LM head replaces `forward` on the instance with a closure over the original model's forward, which a
    deep copy keeps: the copy would silently compute with the original's (trained) weights. The copy gets its class's
    forward back; the caller adds a fused head of its own where it needs one.
    """
    return _runs_own_weights(copy.deepcopy(model)).eval().requires_grad_(False)


def _runs_own_weights(clone: torch.nn.Module) -> torch.nn.Module:
    """Drops the forwards set on instances (closures over the original model), leaving each class's own."""
    for module in clone.modules():
        module.__dict__.pop("forward", None)
    return clone


def _place(model: torch.nn.Module, device_of) -> None:
    """Moves every parameter and buffer of `model` to `device_of(qualified_name)`, in place (tied weights once)."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module._parameters.items():
            if param is not None:
                param.data = param.data.to(device_of(prefix + name))
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device_of(prefix + name))


class HostReference:
    """The policy as it was when this object was made, kept in host memory and moved to the policy's devices (tensor
    by tensor, so a model spread over several devices keeps its layout) only while a pass needs it.

    Costs one copy of the weights in host memory, none on the accelerator between passes.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = host_copy(model)
        self._devices = {
            name: t.device
            for name, t in itertools.chain(
                model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
            )
        }
        self._depth = 0

    @contextlib.contextmanager
    def on_device(self):
        """Yields the reference model on the policy's devices; back in host memory when the outermost use ends."""
        if self._depth == 0:
            _place(self.model, lambda name: self._devices.get(name, torch.device("cpu")))
        self._depth += 1
        try:
            yield self.model
        finally:
            self._depth -= 1
            if self._depth == 0:
                _place(self.model, lambda name: torch.device("cpu"))


def can_keep_host_reference(trainer) -> bool:
    """Whether a host copy of the policy can be the reference of a full fine-tune: not under DeepSpeed/FSDP, whose
    sharded weights cannot simply be copied, nor for a quantized model."""
    model = trainer.model
    return not (
        is_peft_model(model)
        or trainer.is_deepspeed_enabled
        or trainer.is_fsdp_enabled
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
    )


def check_reference_available(trainer, what: str) -> None:
    """Raises a `RuntimeError` where a reference log-prob would come from the trained policy (full fine-tuning with
    no reference kept, after the first update); a reference not kept because every log-prob was cached is rebuilt
    from the model's path first ([`restore_released_reference`])."""
    restore_released_reference(trainer, what)
    if (
        trainer.ref_model is None
        and trainer._host_reference is None
        and not is_peft_model(trainer.model)
        and trainer.state.global_step > 0
    ):
        raise RuntimeError(
            f"Cannot compute {what} after training has started: `precompute_ref_log_probs=True` with full "
            "fine-tuning kept no reference model here (DeepSpeed, FSDP or a quantized model), and the policy has been "
            "updated, so it is no longer the reference. Give the dataset as `eval_dataset` when building the "
            "trainer, pass an explicit `ref_model`, or set `precompute_ref_log_probs=False`."
        )


@contextlib.contextmanager
def reference_for_pass(trainer):
    """During an evaluation or prediction pass the reference kept in host memory is on the device and is the
    trainer's `ref_model`, so TRL's precompute and checks use it rather than the policy."""
    restore_released_reference(trainer, "the reference log-probs of this pass")
    if trainer.ref_model is not None or trainer._host_reference is None:
        yield
        return
    with trainer._host_reference.on_device() as ref:
        trainer.ref_model = ref
        try:
            yield
        finally:
            trainer.ref_model = None


def needs_reference_copy(model, args, peft_config) -> bool:
    """Whether the trainer must copy `model` as its frozen reference: a full fine-tune of a model object (TRL would
    reload a reference from its name) whose reference log-probs are not all cached before training, and not k-bit."""
    if isinstance(model, str) or peft_config is not None or is_peft_model(model):
        return False
    if args.precompute_ref_log_probs and (args.kl_pairing == "dataset" or args.loss_type == "apo_zero_unpaired"):
        return False  # every reference log-prob is cached before training: no reference model is kept
    return not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def keep_a_reference(trainer) -> None:
    """After TRL's set-up, gives `trainer` the reference it still needs when TRL kept none (its reference log-probs
    are cached): a live frozen copy when the KL rows of a per-batch pairing need it each step, else a copy in host
    memory for evaluation KL rows and datasets given later to `evaluate`/`predict`. Nothing has trained yet, so a copy
    of the policy is the reference."""
    from accelerate.utils import is_peft_model

    from trl_kto_ext.trl_internals import add_fused_lm_head, prepare_deepspeed

    if trainer.ref_model is not None:
        return
    if trainer._kl_reference_needed_per_step() and not is_peft_model(trainer.model):
        ref = frozen_copy(trainer.model)
        add_fused_lm_head(ref)
        if trainer.is_deepspeed_enabled:
            trainer.ref_model = prepare_deepspeed(ref, trainer.accelerator)
        else:
            trainer.ref_model = trainer.accelerator.prepare_model(ref, evaluation_mode=True)
    elif can_keep_host_reference(trainer) and not every_log_prob_cached(trainer):
        trainer._host_reference = HostReference(trainer.model)
        add_fused_lm_head(trainer._host_reference.model)
    elif can_keep_host_reference(trainer):
        # Nothing in train() or in evaluating the eval sets given here runs the reference: no copy is kept (one copy
        # of the weights less in memory). A dataset given later to evaluate/predict reloads it from the model's path.
        trainer._reference_released = True


def every_log_prob_cached(trainer) -> bool:
    """Whether the training set and every eval set given to the trainer carry all the reference log-probs their
    passes read (`ref_logps`, and `ref_KL_logps` where the KL term is used), so no pass runs the reference."""
    if trainer.train_dataset is None or not trainer.precompute_ref_logps:
        return False
    evals = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"eval": trainer.eval_dataset}
    needed = ["ref_logps"] + (["ref_KL_logps"] if trainer._uses_kl else [])
    for dataset in [trainer.train_dataset, *(d for d in evals.values() if d is not None)]:
        if not all(name in (getattr(dataset, "column_names", None) or ()) for name in needed):
            return False
    return True


def host_reference(trainer) -> HostReference | None:
    """The trainer's reference kept in host memory, reloaded first where it was not kept
    ([`restore_released_reference`])."""
    restore_released_reference(trainer, "reference log-probs")
    return trainer._host_reference


def restore_released_reference(trainer, what: str) -> None:
    """After training has started, rebuilds the reference that was not kept ([`keep_a_reference`]) from the path the
    policy was loaded from, checked against the hash of the weights whose log-probs were cached, into host memory.

    Raises:
        RuntimeError: the policy was given as a model object (there is nothing to reload the reference from), or the
            weights at its path have changed since the trainer was built.
    """
    if not getattr(trainer, "_reference_released", False) or trainer._host_reference is not None:
        return
    if trainer.state.global_step == 0:
        return  # not updated yet: the policy is still the reference
    source = getattr(trainer, "_reference_source", None)
    if source is None:
        raise RuntimeError(
            f"Cannot compute {what}: with precompute_ref_log_probs=True every reference log-prob of training was "
            "cached, so no reference model was kept, and the policy (given as a model object) has been updated since. "
            "Give this dataset as `eval_dataset` when building the trainer, pass the model by its path (the "
            "reference is then reloaded from it), or pass an explicit `ref_model`."
        )
    from trl_kto_ext.trl_internals import add_fused_lm_head, create_model_from_path, hash_module

    kwargs = dict(trainer.args.model_init_kwargs or {})
    kwargs.setdefault("trust_remote_code", trainer.args.trust_remote_code)
    model = create_model_from_path(source, **kwargs)
    if hash_module(model) != getattr(trainer, "_precompute_model_hash", None):
        raise RuntimeError(
            f"Cannot compute {what}: the reference reloaded from {source!r} is not the model whose log-probs were "
            "cached (its files changed since the trainer was built). Restore those files, or build a new trainer."
        )
    trainer._host_reference = HostReference(model)
    add_fused_lm_head(trainer._host_reference.model)
