"""Worker of test_distributed.py, launched as `torchrun --standalone --nproc_per_node 2 distributed_worker.py OUT.json`.

Each process builds the same trainer (same seed: same weights, same data), computes `compute_loss` on its share of
one fixed global batch (rows 0-4 on rank 0, rows 5-7 on rank 1: uneven on purpose, so that z0 must be weighted by
the KL row counts), then trains two DDP steps. Rank 0 writes what both processes saw to OUT.json.

The same functions build the single-process reference in the test, so both sides see the same global batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest.cpu_args

ROWS = 8
SPLIT = 5  # rank 0 gets rows [0, 5), rank 1 rows [5, 8)
BETA = 0.5
EVAL_ROWS, EVAL_BATCH = 10, 3  # per process: global batches of 6, the last one 4 rows + 2 repeated


def make_eval_set():
    from trl_kto_ext.models.tiny import make_kto_dataset

    return make_kto_dataset(EVAL_ROWS, seed=13, split="heldout")


@torch.no_grad()
def row_logps64(model, rows):
    """log pi(y|x) of each tokenized row, summed over its completion tokens: one unpadded float64 forward per row."""
    import copy

    model64 = copy.deepcopy(model).double().eval()
    out = []
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        per_token = model64(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append(per_token[len(row["prompt_ids"]) - 1 :].sum().item())
    return out


def build_trainer(output_dir, **overrides):
    from conftest import cpu_args

    from trl_kto_ext import KTOExtTrainer
    from trl_kto_ext.models.tiny import build_model, build_tokenizer, make_kto_dataset

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    args = cpu_args(output_dir, per_device_train_batch_size=4, max_steps=2, beta=BETA, **overrides)
    # 30 rows, 9 desirable: lambda_D = 21 / 9 from the counts of the whole set, on every process.
    dataset = make_kto_dataset(30, seed=12, desirable_ratio=0.3)
    trainer = KTOExtTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the reference away from the policy, identically on every process: z0 > 0
        for parameter in trainer.ref_model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return trainer


def fixed_examples(trainer):
    """The global batch: 8 tokenized rows, each with an explicit KL completion (that of row i + 3)."""
    rows = [trainer.train_dataset[i] for i in range(ROWS)]
    return [
        {
            "prompt_ids": row["prompt_ids"],
            "completion_ids": row["completion_ids"],
            "label": row["label"],
            "KL_completion_ids": rows[(i + 3) % ROWS]["completion_ids"],
        }
        for i, row in enumerate(rows)
    ]


def loss_and_z0(trainer, examples):
    """`compute_loss` on `examples` (collated by TRL's collator: the KL rows are the given ones) and z0 before the
    clamp, as logged (`kl_raw`)."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    batch = DataCollatorForUnpairedPreference(pad_token_id=trainer._tokenizer.pad_token_id)(examples)
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    return loss.item(), trainer._metrics["train"]["kl_raw"][-1]


# Per-row weights of the fixed global batch: uneven over the two ranks, so a mean of per-rank weighted means is wrong.
WEIGHTS = [0.5, 1.0, 0.0, 2.0, 0.25, 3.0, 1.5, 4.0]


def weighted_loss(trainer, examples, weights):
    """`compute_loss` on `examples` with per-row `weights` (a `weight` tensor in the batch)."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    batch = DataCollatorForUnpairedPreference(pad_token_id=trainer._tokenizer.pad_token_id)(examples)
    batch["weight"] = torch.tensor(weights, dtype=torch.float32)
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).item()


def main(out_path):
    import torch.distributed as dist

    from trl_kto_ext.report import step_metrics

    torch.set_num_threads(1)  # two processes on two cores
    trainer = build_trainer(os.path.join(os.path.dirname(out_path), "run"))
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    examples = fixed_examples(trainer)
    mine = examples[:SPLIT] if rank == 0 else examples[SPLIT:]
    loss, z0 = loss_and_z0(trainer, mine)
    window = step_metrics.summarize(trainer, "train")  # this process's rows and the other's, reduced once
    mine_weights = WEIGHTS[:SPLIT] if rank == 0 else WEIGHTS[SPLIT:]
    loss_weighted = weighted_loss(trainer, mine, mine_weights)
    trainer._metrics["train"].clear()  # the weighted pass adds no rows to the window checked above
    local = {
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "rows": len(mine),
        "loss": loss,
        "loss_weighted": loss_weighted,
        "z0": z0,
        "lambda_D": trainer.desirable_weight,
        "lambda_U": trainer.undesirable_weight,
        "n_desirable": trainer.loss_aversion.n_desirable,
        "n_undesirable": trainer.loss_aversion.n_undesirable,
        "window": {k: v for k, v in window.items() if k.startswith(("rewards/", "logps/", "count/"))},
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, local)

    # Two DDP training steps over the shuffled, sharded training set: the collectives of every step line up.
    trainer._metrics["train"].clear()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]

    # Evaluation of 10 rows in batches of 3 per process: the last global batch (4 rows) is evened out with repeated
    # rows, which must not be counted. Rank 0 also scores every eval row alone in float64 (the expected values).
    eval_set = make_eval_set()
    trainer.args.per_device_eval_batch_size = EVAL_BATCH
    evaluation = trainer.evaluate(eval_set)
    tokenized = trainer._prepare_dataset(eval_set, trainer.processing_class, trainer.args, "eval")  # on every process
    if rank == 0:
        rows = [dict(row) for row in tokenized]
        policy, reference = row_logps64(trainer.model, rows), row_logps64(trainer.ref_model, rows)
        expected = [(row["label"], BETA * (p - r), p) for row, p, r in zip(rows, policy, reference)]
        with open(out_path, "w") as f:
            json.dump({"ranks": gathered, "train_logs": logs, "eval": evaluation, "eval_rows": expected}, f)
    # Both ranks leave together with the process group torn down. Even so, torch's C++ teardown at interpreter exit
    # aborts a finished gloo worker now and then ("terminate called without an active exception", no Python frame
    # left; about 1 run in 50 alone here, more under the full suite's load). The results are written and the group is gone, so the worker
    # ends here without that teardown: a failure before this line still exits non-zero.
    trainer.accelerator.wait_for_everyone()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
