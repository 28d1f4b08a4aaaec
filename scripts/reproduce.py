#!/usr/bin/env python
"""CPU-sized reproduction of the KTO paper's claims (Ethayarajh et al., arXiv 2402.01306) on the embedded tiny task.

    python scripts/reproduce.py --config configs/reproduce.yaml [--quick] [--out results/]

Arms: base, SFT, SFT+DPO, SFT+KTO, SFT+KTO with 90% of desirable rows dropped (auto lambda), KTO from the base (no
SFT), SFT+KTO with the fast settings. Every trained arm gets the same step budget and the same learning-rate sweep
(one seed, best validation accuracy on held-back TRAIN prompts), then runs on every seed; the metric is exact-match
greedy accuracy on the held-out prompts, which no arm trains or selects on. Writes results.md, results.json,
accuracy.png and kto_curves.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parent),
]  # checkout; reproduction.py

import torch  # noqa: E402
import yaml  # noqa: E402
from reproduction import (  # noqa: E402
    ARM_LABELS,
    ARM_SHORT,
    ARMS,
    build_preference_data,
    run_arm,
    sample_completions,
    train_prompt_split,
)


def load_config(path: str, quick: bool) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    overrides = cfg.pop("quick", {}) or {}
    if quick:
        cfg.update(overrides)
    return cfg


def lr_grid(cfg: dict, arm: str) -> list[float]:
    grid = (cfg.get("lr_grid_per_arm") or {}).get(arm, cfg["lr_grid"])
    return [float(x) for x in grid]


def summarize(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def run(cfg: dict, out: Path) -> dict:
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_kto_ext.models.tiny import build_tiny_default, heldout_prompts

    t_start = time.perf_counter()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(int(cfg.get("torch_threads", 1)))
    model_dir = str(build_tiny_default().model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    feedback_prompts, val = train_prompt_split(cfg["feedback_prompts"], cfg["val_prompts"], cfg["data_seed"])
    heldout = heldout_prompts(cfg.get("heldout_prompts"))
    samples = sample_completions(
        base, tokenizer, feedback_prompts, cfg["samples_per_prompt"], cfg["temperature"], cfg["data_seed"]
    )
    pairs, kto_rows, data_stats = build_preference_data(samples, seed=cfg["data_seed"])
    data_stats.update(kto_rows=len(kto_rows), val_prompts=len(val[0]), heldout_prompts=len(heldout[0]))
    print(f"feedback data: {json.dumps(data_stats)}", flush=True)

    seeds, sweep_seed = [int(s) for s in cfg["seeds"]], int(cfg["sweep_seed"])
    arms = {}
    start_models = {"base": {s: base for s in seeds}, "sft": {}}
    kto_curves = {}
    for arm in cfg["arms"]:
        start, method, _, _ = ARMS[arm]
        t_arm = time.perf_counter()
        common = dict(tokenizer=tokenizer, pairs=pairs, kto_rows=kto_rows, cfg=cfg, val=val, heldout=heldout)
        sweep = []
        if method is None:
            best = run_arm(arm, base, lr=0.0, seed=sweep_seed, **common)
        else:
            for lr in lr_grid(cfg, arm):
                result = run_arm(arm, start_models[start][sweep_seed], lr=lr, seed=sweep_seed, **common)
                print(f"[{arm}] sweep lr={lr:g}: val {result.val_accuracy:.3f} ({result.seconds:.0f}s)", flush=True)
                sweep.append(result)
            best = max(sweep, key=lambda r: r.val_accuracy)  # ties: the first (smallest) learning rate
        runs = {sweep_seed: best}
        for seed in seeds:
            if seed not in runs:
                runs[seed] = (
                    best
                    if method is None  # the base model involves no randomness
                    else run_arm(arm, start_models[start][seed], lr=best.lr, seed=seed, **common)
                )
        if arm == "sft":
            start_models["sft"] = {s: r.model for s, r in runs.items()}
        if arm in ("kto", "kto_nosft"):
            kto_curves[arm] = {"lr": best.lr, "seed": sweep_seed, "log_history": best.log_history}
        held = [runs[s].heldout_accuracy for s in seeds]
        arms[arm] = {
            "label": ARM_LABELS[arm],
            "heldout": summarize(held),
            "per_seed": {str(s): runs[s].heldout_accuracy for s in seeds},
            "val_per_seed": {str(s): runs[s].val_accuracy for s in seeds},
            "best_lr": best.lr if method else None,
            "sweep": [{"lr": r.lr, "val": r.val_accuracy, "heldout": r.heldout_accuracy} for r in sweep],
            "steps": int(cfg["steps"]) if method else 0,
            "lambdas": best.lambdas,
            "seconds_per_run": statistics.fmean(
                r.seconds for r in {id(r): r for r in [*sweep, *runs.values()]}.values()
            ),
            "wall_s": time.perf_counter() - t_arm,
        }
        print(f"[{arm}] best lr={best.lr:g} held-out {held} ({arms[arm]['wall_s']:.0f}s)", flush=True)
        for r in [*sweep, *runs.values()]:
            if arm != "sft" or r.model not in start_models["sft"].values():
                r.model = None  # free what no later arm starts from

    report = {
        "config": cfg,
        "data": data_stats,
        "arms": arms,
        "kto_curves": kto_curves,
        "wall_s": time.perf_counter() - t_start,
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s)",
        "command": " ".join(["python", *sys.argv]),
    }
    write_outputs(report, out)
    return report


def markdown_table(report: dict) -> str:
    lines = [
        "| Arm | Held-out acc. mean ± std | min–max | Per seed | Steps | Best lr | Sweep (lr: val acc.) | λ_D / λ_U "
        "| s / run | Wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in report["arms"].values():
        h = arm["heldout"]
        per_seed = ", ".join(f"{v:.3f}" for v in arm["per_seed"].values())
        sweep = "; ".join(f"{s['lr']:g}: {s['val']:.3f}" for s in arm["sweep"]) or "–"
        lr = f"{arm['best_lr']:g}" if arm["best_lr"] else "–"
        lam = "{:.3g} / {:.3g}".format(*arm["lambdas"]) if arm["lambdas"] else "–"
        lines.append(
            f"| {arm['label']} | {h['mean']:.3f} ± {h['std']:.3f} | {h['min']:.3f}–{h['max']:.3f} | {per_seed} "
            f"| {arm['steps']} | {lr} | {sweep} | {lam} | {arm['seconds_per_run']:.0f} | {arm['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def write_outputs(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    cfg, data = report["config"], report["data"]
    text = [
        "# KTO reproduction in miniature (embedded tiny addition task)",
        "",
        f"Metric: exact-match greedy accuracy on {data['heldout_prompts']} held-out prompts, over seeds {cfg['seeds']} "
        f"(std = sample standard deviation). Learning rate picked on seed {cfg['sweep_seed']} by accuracy on "
        f"{data['val_prompts']} validation prompts from the train split. Every trained arm: {cfg['steps']} steps of "
        f"{cfg['completions_per_step']} completions (DPO: {cfg['completions_per_step'] // 2} pairs).",
        "",
        markdown_table(report),
        "",
        f"Feedback data: {data['samples']} samples ({cfg['samples_per_prompt']} per prompt, temperature "
        f"{cfg['temperature']}) from the base model on {data['prompts']} train prompts, {data['sample_accuracy']:.1%} "
        f"right; {data['pairs']} DPO pairs (one right and one wrong sample of a prompt), the same "
        f"{data['kto_rows']} completions as unpaired KTO rows, and the pairs' right answers as SFT data. The 90%-dropped "
        "arms keep a seeded 10% of the desirable KTO rows and all undesirable ones (lambda_D = n_U / n_D, Eq. 8).",
        "",
        f"Learning-rate grid (every trained arm): {', '.join(f'{x:g}' for x in cfg['lr_grid'])}; ties go to the "
        "smaller rate. `s / run`: mean wall seconds of one run (training + evaluation); `Wall`: the whole arm "
        "(sweep + other seeds). Timings are noisy: the 2 cores were shared with other jobs.",
        "",
        f"Total wall time: {report['wall_s']:.0f} s on {report['hardware']}.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    (out / "results.md").write_text("\n".join(text))
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))

    names = list(report["arms"])
    means = [report["arms"][a]["heldout"]["mean"] for a in names]
    stds = [report["arms"][a]["heldout"]["std"] for a in names]
    colors = ["tab:gray" if a == "base" else "tab:orange" if "nosft" in a else "tab:blue" for a in names]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar(range(len(names)), means, yerr=stds, capsize=5, color=colors, alpha=0.85)
    for i, arm in enumerate(names):
        vals = list(report["arms"][arm]["per_seed"].values())
        ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
        ax.text(i, min(means[i] + stds[i], 1.0) + 0.02, f"{means[i]:.3f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), [ARM_SHORT.get(a, a) for a in names], fontsize=8)
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_ylim(0, 1.1)
    ax.set_title(
        f"Held-out accuracy ({data['heldout_prompts']} prompts), mean ± std over seeds {cfg['seeds']}; dots = seeds; "
        "orange = no SFT"
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    curves = report["kto_curves"]
    fig, axes = plt.subplots(max(len(curves), 1), 2, figsize=(11, 3.6 * max(len(curves), 1)), squeeze=False)
    for row, (arm, run) in zip(axes, curves.items()):
        for ax, keys, title in (
            (row[0], ("rewards/chosen", "rewards/rejected"), "rewards (beta * log-ratio)"),
            (row[1], ("kl", "kl_raw"), "z0 = kl (clamped at 0), kl_raw"),
        ):
            for key in keys:
                pts = [(e["step"], e[key]) for e in run["log_history"] if key in e and "step" in e]
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
            name = ARM_SHORT.get(arm, arm).replace("\n", " ")
            ax.set_title(f"{name}, seed {run['seed']}, lr {run['lr']:g}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kto_curves.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/reproduce.yaml")
    parser.add_argument("--quick", action="store_true", help="Minimal budget: checks that every arm trains.")
    parser.add_argument("--out", default=None, help="Output folder (default: results/, or results/quick with --quick)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.quick)
    out = Path(args.out or ("results/quick" if args.quick else "results"))
    report = run(cfg, out)
    print(markdown_table(report))
    print(f"Wall time {report['wall_s']:.0f} s; outputs in {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
