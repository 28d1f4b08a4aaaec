#!/usr/bin/env python
"""Which distributed setup accelerate gives KTOExtTrainer on CPU when FSDP2 is asked for, by each route.

Usage (two CPU processes, gloo):
    torchrun --standalone --nproc_per_node 2 scripts/fsdp_cpu_probe.py trainer_args   # KTOExtConfig(fsdp=..., version 2)
    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 FSDP_TRANSFORMER_CLS_TO_WRAP=LlamaDecoderLayer \\
        torchrun --standalone --nproc_per_node 2 scripts/fsdp_cpu_probe.py env           # accelerate's environment
    torchrun --standalone --nproc_per_node 2 scripts/fsdp_cpu_probe.py plugin         # Accelerator(fsdp_plugin=v2)
    torchrun --standalone --nproc_per_node 2 scripts/fsdp_cpu_probe.py manual         # fully_shard, then the Trainer

Each rank prints the accelerator's distributed type, whether the Trainer sees FSDP, the class of the wrapped model
after one training step (or `prepare`), and the class of its first parameter (`DTensor` when really sharded).
With accelerate 1.15 every route prints MULTI_CPU / DistributedDataParallel / Parameter: `AcceleratorState` selects
`DistributedType.FSDP` only inside its branch for accelerator devices (MULTI_GPU, MULTI_XPU, MULTI_NPU, ...), which a
CPU run (MULTI_CPU) never enters, so the FSDP settings are dropped without a message.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch


def main(route: str) -> None:
    torch.set_num_threads(1)
    from trl_kto_ext.models.tiny import build_model, build_tokenizer, make_kto_dataset

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    if route == "manual":  # torch's fully_shard by hand before the Trainer (LoRA: the Trainer cannot deepcopy it)
        import torch.distributed as dist
        from peft import LoraConfig, get_peft_model
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    if route == "plugin":
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin

        accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
        wrapped = accelerator.prepare(model)
        fsdp = accelerator.is_fsdp2
    else:
        from trl_kto_ext import KTOExtConfig, KTOExtTrainer

        extra = {}
        if route == "trainer_args":
            extra = dict(
                fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
            )
        args = KTOExtConfig(
            output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
            save_strategy="no", per_device_train_batch_size=4, max_steps=1, disable_tqdm=True, **extra,
        )  # fmt: skip
        trainer = KTOExtTrainer(
            model=model, args=args, train_dataset=make_kto_dataset(16, seed=0), processing_class=tokenizer
        )
        trainer.train()
        accelerator, wrapped, fsdp = trainer.accelerator, trainer.model_wrapped, trainer.is_fsdp_enabled
    parameter = next(wrapped.parameters())
    print(
        f"rank {accelerator.process_index}/{accelerator.num_processes} route {route}: "
        f"{accelerator.distributed_type.value}, fsdp={fsdp}, model={type(wrapped).__name__}, "
        f"parameter={type(parameter).__name__}",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ROUTE", "trainer_args"))
