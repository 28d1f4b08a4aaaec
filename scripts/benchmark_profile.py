#!/usr/bin/env python
"""Where one training step's time goes, per arm of scripts/benchmark.py (same model, data and settings).

Timers, not a sampling profiler: forward hooks on each model's decoder body (the transformer layers, no LM head) time
the policy's pass with gradients, its no-gradient passes (KL rows) and the reference's passes; `accelerator.backward`
(which holds gradient checkpointing's recomputed forward) and the optimizer step (`on_pre_optimizer_step` to
`on_optimizer_step`) are timed around; "rest" is the step minus those (LM heads, log-prob reductions, loss, metrics).
Each figure is CPU seconds of this process per step (`time.process_time`), the mean over the steps after the warm-up
ones, with wall seconds beside; a shared machine's wall clock mostly measures the scheduler.

All arms run in one process, one after the other (memory is measured by scripts/benchmark.py, not here).

Usage:
    python scripts/benchmark_profile.py --model smollm2-135m --gradient-checkpointing --arms-to-profile sft,ext_default
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

from benchmark import parse_args as bench_args
from benchmark_setup import arms_for, settings_from_args

PHASES = ("policy fwd (grad)", "policy fwd (no grad)", "reference fwd", "backward", "optimizer", "rest")


class Clock:
    """(wall, CPU) seconds accumulated per phase within the current step."""

    def __init__(self):
        self.step: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.steps: list[dict[str, list[float]]] = []

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def add(self, phase: str, start: tuple[float, float]) -> None:
        wall, cpu = self.now()
        self.step[phase][0] += wall - start[0]
        self.step[phase][1] += cpu - start[1]


def _time_body(body, role: str, clock: Clock) -> None:
    import torch

    starts = []

    def pre(module, args, kwargs):
        starts.append(clock.now())

    def post(module, args, kwargs, output):
        phase = (
            "reference fwd"
            if role == "reference"
            else f"policy fwd ({'grad' if torch.is_grad_enabled() else 'no grad'})"
        )
        clock.add(phase, starts.pop())

    body.register_forward_pre_hook(pre, with_kwargs=True)
    body.register_forward_hook(post, with_kwargs=True)


def profile(arm, settings: dict) -> dict:
    import benchmark_child
    from transformers import TrainerCallback

    clock = Clock()
    trainers = []

    class Phases(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.step = defaultdict(lambda: [0.0, 0.0])
            self.start = clock.now()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_start = clock.now()

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock.add("optimizer", self.optimizer_start)

        def on_step_end(self, args, state, control, **kwargs):
            clock.add("step", self.start)
            clock.steps.append({phase: list(v) for phase, v in clock.step.items()})
            clock.step = defaultdict(lambda: [0.0, 0.0])  # passes after the last step (the one-pass timings) go here

    # run_arm builds the trainer and trains; hook in when `train()` starts, after the trainer exists.
    from transformers import Trainer

    original_train = Trainer.train

    def train(self, *args, **kwargs):
        trainers.append(self)
        self.add_callback(Phases())
        _time_body(self.model.get_decoder(), "policy", clock)
        for ref in (getattr(self, "ref_model", None), getattr(getattr(self, "_host_reference", None), "model", None)):
            if ref is not None:
                _time_body(ref.get_decoder(), "reference", clock)
        backward = self.accelerator.backward

        def timed_backward(loss, **kw):
            start = clock.now()
            try:
                return backward(loss, **kw)
            finally:
                clock.add("backward", start)

        self.accelerator.backward = timed_backward
        return original_train(self, *args, **kwargs)

    Trainer.train = train
    try:
        result = benchmark_child.run_arm(arm, settings)
    finally:
        Trainer.train = original_train
    measured = clock.steps[settings["warmup_steps"] :]
    table = {}
    for phase in ("step",) + PHASES[:-1]:
        table[phase] = [sum(s.get(phase, [0, 0])[i] for s in measured) / len(measured) for i in (0, 1)]
    table["rest"] = [table["step"][i] - sum(table[p][i] for p in PHASES[:-1]) for i in (0, 1)]
    return dict(arm=arm.name, phases=table, n_steps=len(measured), median_cpu_step_s=result["median_cpu_step_s"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms-to-profile", default="sft,trl_default,trl_precompute,ext_default,ext_precompute")
    parser.add_argument("--profile-out")
    own, rest = parser.parse_known_args(argv)
    args = bench_args(rest)
    settings = settings_from_args(args)
    arms = {a.name: a for a in arms_for(args.kl_subset_size, args.batch_size)}
    rows = [profile(arms[name], settings) for name in own.arms_to_profile.split(",")]
    header = "| arm | step | " + " | ".join(PHASES) + " |"
    print(f"CPU s/step (wall s/step), mean of {rows[0]['n_steps']} steps after {settings['warmup_steps']} warm-up")
    print(header)
    print("|---" * (len(PHASES) + 2) + "|")
    for row in rows:
        cells = [f"{row['phases'][p][1]:.2f} ({row['phases'][p][0]:.2f})" for p in ("step",) + PHASES]
        print(f"| {row['arm']} | " + " | ".join(cells) + " |")
    if own.profile_out:
        with open(own.profile_out, "w") as f:
            json.dump(dict(settings=settings, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
