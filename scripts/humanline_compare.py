#!/usr/bin/env python
"""Offline humanline KTO vs offline KTO vs online KTO on the embedded tiny addition task, from the base model (no SFT).

    python scripts/humanline_compare.py [--quick] [--out results/]

The harness of scripts/online_compare.py (same prompts, verifier, budget, schedule, learning-rate grid and selection
rule): every method generates the same number of completions (steps x batch) and takes the same number of optimizer
steps. Offline KTO and offline humanline KTO train on the same rows, sampled once from the base model; online KTO
samples from the current policy at every step. Humanline (arXiv 2509.24207) clamps each completion token's
log(pi_theta/pi_ref) to [-1.0, 1.5] and syncs the reference to the policy (alpha 1.0) every `sync` steps; the sync
interval is swept together with the learning rate on seed 0 (validation prompts of the train split). Writes
humanline.json to --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from online_compare import FULL, QUICK, ValCurve, common_args, make_trainer, prepare_data  # noqa: E402
from reproduction import fresh_copy  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

from trl_kto_ext.models import tiny  # noqa: E402

LABELS = {"offline_kto": "offline KTO", "humanline": "offline humanline KTO", "online_kto": "online KTO"}
SYNC_GRID = [1, 10]  # humanline's reference sync interval, swept with the learning rate (steps)


def make(method, model, tokenizer, data, cfg, out, lr, seed, sync):
    if method != "humanline":
        return make_trainer(method, model, tokenizer, data, cfg, out, lr, seed)
    from trl_kto_ext import KTOExtConfig, KTOExtTrainer

    args = KTOExtConfig(**common_args(cfg, out, lr, seed), max_length=64, beta=cfg["beta"], humanline=True,
                        ref_model_sync_steps=sync)  # fmt: skip
    return KTOExtTrainer(model=model, args=args, train_dataset=data["kto_rows"][seed], processing_class=tokenizer)


def run(method, base, tokenizer, data, cfg, lr, seed, val, heldout, sync=None):
    torch.manual_seed(seed)
    curve = ValCurve(tokenizer, val, cfg["eval_every"])
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer = make(method, fresh_copy(base), tokenizer, data, cfg, out, lr, seed, sync)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(curve)
        trainer.train()
        seconds = time.perf_counter() - start - curve.eval_seconds
    model = trainer.model.eval()
    model.__dict__.pop("forward", None)  # TRL's fused-LM-head patch (see reproduction.fresh_copy)
    unclamped = [e["humanline/unclamped"] for e in trainer.state.log_history if "humanline/unclamped" in e]
    result = dict(method=method, seed=seed, lr=lr, sync=sync, seconds=round(seconds, 1),
                  val_accuracy=tiny.greedy_accuracy(model, tokenizer, *val),
                  heldout_accuracy=tiny.greedy_accuracy(model, tokenizer, *heldout), val_curve=curve.points,
                  unclamped_mean=statistics.fmean(unclamped) if unclamped else None)  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("curve")}), flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (checks the script only)")
    parser.add_argument("--out", default="results", help="folder for humanline.json")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    torch.set_num_threads(1)
    default = tiny.build_tiny_default()
    base, tokenizer = default.load_model().eval(), default.load_tokenizer()
    heldout = tiny.heldout_prompts(16 if args.quick else None)
    start = time.perf_counter()
    data, val, per_prompt = prepare_data(base, tokenizer, cfg, cfg["seeds"])
    results, best = [], {}
    for method in LABELS:
        syncs = (SYNC_GRID[:1] if args.quick else SYNC_GRID) if method == "humanline" else [None]
        sweep = [run(method, base, tokenizer, data, cfg, lr, cfg["seeds"][0], val, heldout, sync)
                 for sync in syncs for lr in cfg["lr_grid"]]  # fmt: skip
        pick = max(sweep, key=lambda r: (r["val_accuracy"], -r["lr"], -(r["sync"] or 0)))
        best[method] = (pick["lr"], pick["sync"])
        results += sweep
        results += [run(method, base, tokenizer, data, cfg, pick["lr"], s, val, heldout, pick["sync"])
                    for s in cfg["seeds"][1:]]  # fmt: skip
    table = {}
    for method in LABELS:
        lr, sync = best[method]
        runs = [r for r in results if r["method"] == method and r["lr"] == lr and r["sync"] == sync]
        acc = [r["heldout_accuracy"] for r in runs]
        table[method] = dict(lr=lr, sync=sync, heldout_mean=statistics.fmean(acc), heldout_per_seed=acc,
                             seconds_mean=statistics.fmean(r["seconds"] for r in runs))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(config=cfg, sync_grid=SYNC_GRID, completions_per_prompt_offline=per_prompt,
                   offline_data=data["stats"], base_heldout_accuracy=tiny.greedy_accuracy(base, tokenizer, *heldout),
                   table=table, runs=results, total_seconds=round(time.perf_counter() - start, 1))  # fmt: skip
    (out / "humanline.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"base held-out accuracy: {summary['base_heldout_accuracy']:.2f}")
    print("| method | lr | sync every | held-out accuracy, mean (per seed) | train seconds per run |")
    print("|---|---|---|---|---|")
    for method, row in table.items():
        seeds = ", ".join(f"{a:.2f}" for a in row["heldout_per_seed"])
        print(f"| {LABELS[method]} | {row['lr']:g} | {row['sync'] or '-'} | {row['heldout_mean']:.3f} ({seeds}) | "
              f"{row['seconds_mean']:.0f} |")  # fmt: skip
    print(f"wrote {out / 'humanline.json'} in {summary['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
