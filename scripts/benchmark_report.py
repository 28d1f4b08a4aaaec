"""Reporting of scripts/benchmark.py: the per-arm summary, the target checks and the Markdown tables."""

from __future__ import annotations

import math
import os
import platform
import statistics


def _ratio(a, b):
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def summarise(runs: dict[str, list[dict]], arms: list) -> list[dict]:
    """One row per arm (`arms`: the `Arm`s of benchmark.py); the step times of all repeats are pooled before the median."""
    rows = []
    for arm in arms:
        results = runs.get(arm.name) or []
        if not results:
            continue
        warm = results[0]["_warmup_steps"]
        aggregate = statistics.mean if results[0].get("_aggregate") == "mean" else statistics.median
        pooled = [t for r in results for t in r["step_s"][warm:]]
        pooled_wall = [t for r in results for t in r["wall_step_s"]]
        pooled_cpu = [t for r in results for t in r["cpu_step_s"][warm:]]
        row = dict(results[0])
        row.pop("_warmup_steps", None)
        row.pop("_aggregate", None)
        row.update(
            repeats=len(results),
            median_step_s=aggregate(pooled) if pooled else float("nan"),
            median_wall_step_s=aggregate(pooled_wall) if pooled_wall else float("nan"),
            median_cpu_step_s=aggregate(pooled_cpu) if pooled_cpu else float("nan"),
            run_medians_s=[r["median_step_s"] for r in results],
            precompute_s=statistics.median(r["precompute_s"] for r in results),
            precompute_cpu_s=statistics.median(r["precompute_cpu_s"] for r in results),
            construct_s=statistics.median(r["construct_s"] for r in results),
            peak_rss_mb=max(r["peak_rss_mb"] for r in results),
        )
        if "one_pass_fwd_s" in results[0]:
            row["one_pass_fwd_s"] = statistics.median(r["one_pass_fwd_s"] for r in results)
            row["one_pass_fwd_cpu_s"] = statistics.median(r["one_pass_fwd_cpu_s"] for r in results)
        for key in ("one_pass_sorted_fwd_s", "one_pass_sorted_fwd_cpu_s"):
            if key in results[0]:
                row[key] = statistics.median(r[key] for r in results)
        rows.append(row)
    by_name = {row["arm"]: row for row in rows}
    sft, trl_default = by_name.get("sft"), by_name.get("trl_default")
    for row in rows:
        row["x_sft"] = _ratio(row["median_step_s"], sft and sft["median_step_s"])
        row["x_trl_default"] = _ratio(row["median_step_s"], trl_default and trl_default["median_step_s"])
        row["one_time_steps"] = _ratio(row["precompute_s"], row["median_step_s"]) if row["precompute_s"] else 0.0
        row["one_time_passes"] = _ratio(row["precompute_s"], row.get("one_pass_fwd_s"))
        row["x_sft_cpu"] = _ratio(row["median_cpu_step_s"], sft and sft["median_cpu_step_s"])
        row["x_trl_default_cpu"] = _ratio(row["median_cpu_step_s"], trl_default and trl_default["median_cpu_step_s"])
        row["one_time_passes_cpu"] = _ratio(row["precompute_cpu_s"], row.get("one_pass_fwd_cpu_s"))
    return rows


def check_targets(rows: list[dict], suffix: str = "") -> list[dict]:
    """Each target on wall-clock medians and on CPU-time medians (the latter is robust to other processes' load).

    With `suffix="_compact"`, the KTOExtTrainer arms are the experimental `_compact` ones, still compared with stock
    TRL (and, for the SFT floor, with both the stock and the compact SFT arm)."""
    by = {row["arm"]: row for row in rows}

    def get(name, key):
        return by[name].get(key) if name in by else None

    targets = []

    def add(num, den, limit, key="median_step_s", cpu_key="median_cpu_step_s"):
        value = _ratio(get(num, key), get(den, key))
        value_cpu = _ratio(get(num, cpu_key), get(den, cpu_key)) if cpu_key else None
        what = "peak RSS" if key == "peak_rss_mb" else "s/step"
        targets.append(
            dict(
                target=f"{num} {what} <= {limit}x {den}",
                value=value,
                value_cpu=value_cpu,
                limit=limit,
                met=None if value is None else bool(value <= limit),
                met_cpu=None if value_cpu is None else bool(value_cpu <= limit),
            )
        )

    default, cached, fastest = (f"{name}{suffix}" for name in ("ext_default", "ext_cached", "ext_fastest"))
    add(default, "trl_default", 0.8)
    add(cached, "trl_precompute", 1.0)
    add(fastest, "trl_default", 0.6)
    add(fastest, "sft", 1.15)
    if suffix:
        add(fastest, f"sft{suffix}", 1.15)
    add(default, "trl_default", 1.0, key="peak_rss_mb", cpu_key=None)
    add(cached, "trl_precompute", 1.0, key="peak_rss_mb", cpu_key=None)
    add(fastest, "trl_precompute", 1.0, key="peak_rss_mb", cpu_key=None)
    row = by.get(cached)
    value = row and row.get("one_time_passes")
    value_cpu = row and row.get("one_time_passes_cpu")
    targets.append(
        dict(
            target=f"{cached} reference cache <= 1 no-grad forward pass over the training set",
            value=value,
            value_cpu=value_cpu,
            limit=1.0,
            met=None if value is None else bool(value <= 1.0),
            met_cpu=None if value_cpu is None else bool(value_cpu <= 1.0),
        )
    )
    return targets


def _fmt(value, spec=".3f", none="n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def format_table(rows: list[dict], settings: dict, meta: dict) -> str:
    first = rows[0]
    header = (
        f"precision: {'bf16 (autocast)' if settings['bf16'] else 'fp32'} | gradient checkpointing: "
        f"{'on' if settings['gradient_checkpointing'] else 'off'} | device: {first['device']} "
        f"({first['torch_threads']} threads) | model: Llama {first['n_params'] / 1e6:.1f}M params, vocab "
        f"{settings['vocab_size']} | batch {settings['batch_size']} | prompt {settings['prompt_len'][0]}-"
        f"{settings['prompt_len'][1]} + completion {settings['completion_len'][0]}-{settings['completion_len'][1]} "
        f"tokens | steps: {settings['warmup_steps']} warm-up + {settings['steps']} measured"
        f" | s/step: {'mean over one epoch (column headed median)' if settings.get('aggregate') == 'mean' else 'median'}"
        f"{' x ' + str(first['repeats']) + ' repeats' if first['repeats'] > 1 else ''} | load avg at start "
        f"{meta['loadavg_start']}"
    )
    columns = [
        "arm",
        "median s/step",
        "x SFT",
        "x TRL default",
        "CPU s/step",
        "x SFT (CPU)",
        "x TRL default (CPU)",
        "wall s/step",
        "one-time s",
        "one-time (steps)",
        "one-time (fwd passes)",
        "peak RSS MB",
        "tokens/step (real / padded)",
        "passes/step (theory)",
        "fwd-equiv",
    ]
    if any(row.get("cuda_peak_mb") for row in rows):
        columns.insert(columns.index("peak RSS MB") + 1, "CUDA peak MB")
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [
            row["arm"],
            _fmt(row["median_step_s"]),
            _fmt(row["x_sft"], ".2f"),
            _fmt(row["x_trl_default"], ".2f"),
            _fmt(row["median_cpu_step_s"], ".2f"),
            _fmt(row["x_sft_cpu"], ".2f"),
            _fmt(row["x_trl_default_cpu"], ".2f"),
            _fmt(row["median_wall_step_s"]),
            _fmt(row["precompute_s"], ".2f") if row["precompute_s"] else "0",
            _fmt(row["one_time_steps"], ".1f") if row["precompute_s"] else "0",
            _fmt(row["one_time_passes"], ".2f", "-")
            + (f" (CPU {_fmt(row['one_time_passes_cpu'], '.2f')})" if row.get("one_time_passes_cpu") else ""),
            _fmt(row["peak_rss_mb"], ".0f"),
            f"{_fmt(row['tokens_per_step'], '.0f')} / {_fmt(row['padded_tokens_per_step'], '.0f')}"
            + (
                f" (+KL {_fmt(row['kl_padded_tokens_per_step'], '.0f')})"
                if row.get("kl_padded_tokens_per_step")
                else ""
            ),
            row["passes"],
            _fmt(row["fwd_equivalents"], ".2f"),
        ]
        if "CUDA peak MB" in columns:
            cells.insert(columns.index("CUDA peak MB"), _fmt(row.get("cuda_peak_mb"), ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_targets(targets: list[dict]) -> str:
    def met(value):
        return "n/a" if value is None else ("yes" if value else "no")

    lines = [
        "| target | measured (wall clock) | measured (CPU time) | limit | met (wall) | met (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        cpu = _fmt(t["value_cpu"], ".2f", "-")
        lines.append(
            f"| {t['target']} | {_fmt(t['value'], '.2f')} | {cpu} | {t['limit']} | {met(t['met'])} | "
            f"{met(t['met_cpu']) if t['value_cpu'] is not None else '-'} |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
