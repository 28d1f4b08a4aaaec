"""Worker of test_sharding.py: `torchrun --standalone --nproc_per_node 2 fsdp_worker.py OUT.txt` asks for FSDP on CPU
and writes the error message rank 0 got (or "no error")."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest.cpu_args


def main(out: str) -> None:
    from conftest import cpu_args

    from trl_kto_ext import KTOExtTrainer
    from trl_kto_ext.models.tiny import build_model, build_tokenizer, make_kto_dataset

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    args = cpu_args(os.path.dirname(out), fsdp=True, fsdp_config={"version": 2})
    try:
        KTOExtTrainer(model, args=args, train_dataset=make_kto_dataset(16, seed=0), processing_class=tokenizer)
        message = "no error"
    except ValueError as err:
        message = str(err)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            f.write(message)
    import torch.distributed as dist

    if dist.is_initialized():  # leave together, with the process group torn down (see distributed_worker.py)
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without torch's C++ teardown at exit, which can abort a finished gloo worker (distributed_worker.py)


if __name__ == "__main__":
    main(sys.argv[1])
