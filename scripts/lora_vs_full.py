#!/usr/bin/env python
"""Peak memory and median step time of KTO with LoRA vs full fine-tuning, each arm in its own fresh process.

    python scripts/lora_vs_full.py [--steps 30] [--threads 1] [--size tiny|medium] [--json out.json]

Both arms train KTOExtTrainer on the same data with the same batch; only the model set-up differs:
- full: every weight trainable, plus a frozen copy of the model as the reference;
- lora: `peft_config=LoraConfig(r=16, all-linear)`; no reference copy (the reference is the base with adapters off).

Memory is the process's peak resident set (`resource.getrusage(...).ru_maxrss`, Linux: KiB), read at the end of a
fresh subprocess per arm, so nothing from the other arm or from the parent counts; "RSS growth in training" is that
peak minus the resident set just before `trainer.train()`. The exact bytes of the tensors the trainer holds
(weights of the policy and of the reference, gradients = trainable weights, AdamW state) are counted too, as they do
not depend on the allocator. Step time is the median wall time of the optimizer steps after `--warmup` steps, and the median CPU time of the
process over the same steps (with one thread, the CPU time is the work done, which other processes sharing the
cores inflate far less than the wall time).

`--size tiny` is the embedded tiny default (`trl_kto_ext.models.tiny.build_tiny_default`); `--size medium` is a randomly
initialised Llama of the same shape family (hidden 512, 8 layers, ~26M parameters), closer to where LoRA pays off.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MEDIUM = dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _model_dir(size: str, workdir: str) -> str:
    if size == "tiny":
        from trl_kto_ext.models.tiny import build_tiny_default

        return str(build_tiny_default().model_dir)
    from trl_kto_ext.models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    path = os.path.join(workdir, f"{size}-model")
    if not os.path.isdir(path):
        build_model(tokenizer, seed=0, **MEDIUM).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def run_arm(arm: str, opts: argparse.Namespace) -> dict:
    """One arm, in this (fresh) process."""
    import torch

    torch.set_num_threads(opts.threads)
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    from trl_kto_ext import KTOExtConfig, KTOExtTrainer
    from trl_kto_ext.models.tiny import make_kto_dataset

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu_times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu_start)

    model_dir = _model_dir(opts.size, opts.workdir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = KTOExtConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
            per_device_train_batch_size=opts.batch_size,
            max_steps=opts.warmup + opts.steps,
            learning_rate=1e-3 if arm == "lora" else 1e-5,
            logging_steps=opts.warmup + opts.steps,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        peft_config = (
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
            if arm == "lora"
            else None
        )
        trainer = KTOExtTrainer(
            model_dir,
            args=args,
            train_dataset=make_kto_dataset(opts.rows, seed=0),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[timer],
        )
        rss_before_train = _rss_bytes()
        trainer.train()
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

        def tensor_bytes(tensors):
            seen = {}
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    seen[t.data_ptr()] = t.numel() * t.element_size()
            return sum(seen.values())

        models = [m for m in (trainer.model, trainer.ref_model) if m is not None]
        params = [p for m in models for p in m.parameters()]
        optimizer_state = [v for state in trainer.optimizer.state.values() for v in state.values()]
        return {
            "arm": arm,
            "size": opts.size,
            "threads": opts.threads,
            "batch_size": opts.batch_size,
            "total_params": sum(p.numel() for p in trainer.model.parameters()),
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "has_ref_model": trainer.ref_model is not None,
            "param_bytes": tensor_bytes(params),
            # Gradients are freed after each optimizer step; during backward they take the trainable weights' size.
            "grad_bytes": tensor_bytes(p for p in trainer.model.parameters() if p.requires_grad),
            "optimizer_bytes": tensor_bytes(optimizer_state),
            "peak_rss_bytes": peak_rss,
            "train_rss_increment_bytes": max(peak_rss - rss_before_train, 0),
            "median_step_s": statistics.median(timer.times[opts.warmup :]),
            "median_step_cpu_s": statistics.median(timer.cpu_times[opts.warmup :]),
            "steps_timed": len(timer.times[opts.warmup :]),
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(results: list[dict]) -> str:
    rows = [
        "| arm | trainable / total params | reference copy | weights held (MiB) | grads + AdamW state (MiB) "
        "| peak RSS (MiB) | RSS growth in training (MiB) | median step, wall (ms) | median step, CPU (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['arm']} | {r['trainable_params']:,} / {r['total_params']:,} | {'yes' if r['has_ref_model'] else 'no'} "
            f"| {_mib(r['param_bytes'])} | {_mib(r['grad_bytes'] + r['optimizer_bytes'])} "
            f"| {_mib(r['peak_rss_bytes'])} | {_mib(r['train_rss_increment_bytes'])} | {1000 * r['median_step_s']:.0f} "
            f"| {1000 * r['median_step_cpu_s']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "medium"], default="tiny")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--arm", choices=["full", "lora"], help=argparse.SUPPRESS)  # internal: run one arm
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "trl_kto_ext_lora_vs_full"))
    opts = parser.parse_args()

    if opts.arm:
        print("RESULT " + json.dumps(run_arm(opts.arm, opts)), flush=True)
        return

    os.makedirs(opts.workdir, exist_ok=True)
    if opts.size != "tiny":
        _model_dir(opts.size, opts.workdir)  # build once, outside the measured processes
    results = []
    for arm in ("full", "lora"):
        cmd = [sys.executable, __file__, "--arm", arm, *sys.argv[1:]]
        env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"arm {arm!r} failed (exit code {proc.returncode})")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(f"{arm}: done", file=sys.stderr, flush=True)

    print(
        f"KTO, {opts.size} model, batch {opts.batch_size}, {opts.threads} thread(s), "
        f"median of {opts.steps} steps after {opts.warmup} warm-up steps, CPU\n"
    )
    print(table(results))
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
