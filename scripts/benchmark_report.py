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


def step_statistic(settings_or_row: dict) -> str:
    """What every s/step figure is: "mean" (over one whole epoch, every step) or "median" (after the warm-up)."""
    return "mean" if settings_or_row.get("aggregate", settings_or_row.get("_aggregate")) == "mean" else "median"


def summarise(runs: dict[str, list[dict]], arms: list) -> list[dict]:
    """One row per arm (`arms`: the `Arm`s of benchmark.py); the step times of all repeats are pooled before the
    statistic (median, or mean over the epoch for the chat shape; the keys say `median_*` for both, `step_stat` says
    which). Peak memory (`peak_mem_mb`) is CUDA's `max_memory_allocated` where measured, else the peak RSS."""
    rows = []
    for arm in arms:
        results = runs.get(arm.name) or []
        if not results:
            continue
        warm = results[0]["_warmup_steps"]
        stat = step_statistic(results[0])
        aggregate = statistics.mean if stat == "mean" else statistics.median
        pooled = [t for r in results for t in r["step_s"][warm:]]
        pooled_wall = [t for r in results for t in r["wall_step_s"]]
        pooled_cpu = [t for r in results for t in r["cpu_step_s"][warm:]]
        row = dict(results[0])
        row.pop("_warmup_steps", None)
        row.pop("_aggregate", None)
        row.update(
            step_stat=stat,
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
        cuda = [r["cuda_peak_mb"] for r in results if r.get("cuda_peak_mb")]
        row["peak_mem_mb"], row["peak_mem_kind"] = (max(cuda), "CUDA") if cuda else (row["peak_rss_mb"], "RSS")
        for key in (
            "one_pass_fwd_s",
            "one_pass_fwd_cpu_s",
            "one_pass_sorted_fwd_s",
            "one_pass_sorted_fwd_cpu_s",
            "one_pass_own_fwd_s",
            "one_pass_own_fwd_cpu_s",
            "second_run_precompute_s",
            "second_run_precompute_cpu_s",
        ):
            if key in results[0]:
                row[key] = statistics.median(r[key] for r in results)
        if "second_run_ref_forwards" in results[0]:
            row["second_run_ref_forwards"] = max(r["second_run_ref_forwards"] for r in results)
        rows.append(row)
    by_name = {row["arm"]: row for row in rows}
    sft, trl_default = by_name.get("sft"), by_name.get("trl_default")
    for row in rows:
        row["x_sft"] = _ratio(row["median_step_s"], sft and sft["median_step_s"])
        row["x_trl_default"] = _ratio(row["median_step_s"], trl_default and trl_default["median_step_s"])
        row["one_time_steps"] = _ratio(row["precompute_s"], row["median_step_s"]) if row["precompute_s"] else 0.0
        # one-time costs in PASS_UNIT (TRL's padded no-grad pass over the training set's target rows)
        row["one_time_passes"] = _ratio(row["precompute_s"], row.get("one_pass_fwd_s"))
        row["one_time_passes_cpu"] = _ratio(row["precompute_cpu_s"], row.get("one_pass_fwd_cpu_s"))
        row["one_time_own_passes_cpu"] = _ratio(row["precompute_cpu_s"], row.get("one_pass_own_fwd_cpu_s"))
        row["second_run_passes"] = _ratio(row.get("second_run_precompute_s"), row.get("one_pass_fwd_s"))
        row["second_run_passes_cpu"] = _ratio(row.get("second_run_precompute_cpu_s"), row.get("one_pass_fwd_cpu_s"))
        row["x_sft_cpu"] = _ratio(row["median_cpu_step_s"], sft and sft["median_cpu_step_s"])
        row["x_trl_default_cpu"] = _ratio(row["median_cpu_step_s"], trl_default and trl_default["median_cpu_step_s"])
    return rows


# The unit of the reference cache's cost, as printed under the targets table.
PASS_UNIT = (
    "1 pass = one no-grad forward of the training set's target rows (not the KL rows) through TRL's "
    "`KTOTrainer.compute_ref_log_probs` (padded batches of batch_size rows in dataset order, TRL's fused LM head), "
    "timed in the same process; 'own pass' = the same rows through KTOExtTrainer's fast path"
)


def _target(name, value, value_cpu, limit) -> dict:
    return dict(
        target=name,
        value=value,
        value_cpu=value_cpu,
        limit=limit,
        met=None if value is None else bool(value <= limit),
        met_cpu=None if value_cpu is None else bool(value_cpu <= limit),
    )


def check_targets(rows: list[dict], suffix: str = "") -> list[dict]:
    """Issue 12's targets, each on the wall-clock and on the CPU-time statistic (the latter is robust to other
    processes' load), computed from the rows of [`summarise`]:

    - `ext_default` s/step <= 0.6x `trl_default` and <= 1.2x `sft`;
    - `ext_cached` (precompute_ref_log_probs=True) s/step <= 0.6x `trl_precompute`;
    - peak memory (`peak_mem_mb`) <= 0.75x TRL's for the same settings (`ext_default` vs `trl_default`, `ext_cached`
      vs `trl_precompute`);
    - `ext_cached`'s reference cache <= 1.0 pass ([`PASS_UNIT`]) on a first run, and 0 reference forwards on a second
      run with the same model, data and cache directory.

    With `suffix="_compact"` / `"_packed"`, the ext arms are those variants (and the SFT floor also `sft_compact`).
    """
    by = {row["arm"]: row for row in rows}

    def get(name, key):
        return by[name].get(key) if name in by else None

    targets = []

    def add(num, den, limit, key="median_step_s", cpu_key="median_cpu_step_s"):
        value = _ratio(get(num, key), get(den, key))
        value_cpu = _ratio(get(num, cpu_key), get(den, cpu_key)) if cpu_key else None
        what = "s/step" if key == "median_step_s" else f"peak memory ({get(num, 'peak_mem_kind') or 'n/a'})"
        targets.append(_target(f"{num} {what} <= {limit}x {den}", value, value_cpu, limit))

    default, cached = f"ext_default{suffix}", f"ext_cached{suffix}"
    add(default, "trl_default", 0.6)
    add(default, "sft", 1.2)
    if suffix and f"sft{suffix}" in by:
        add(default, f"sft{suffix}", 1.2)
    add(cached, "trl_precompute", 0.6)
    add(default, "trl_default", 0.75, key="peak_mem_mb", cpu_key=None)
    add(cached, "trl_precompute", 0.75, key="peak_mem_mb", cpu_key=None)
    targets.append(
        _target(
            f"{cached} reference cache, first run, in passes (see unit) <= 1.0",
            get(cached, "one_time_passes"),
            get(cached, "one_time_passes_cpu"),
            1.0,
        )
    )
    forwards = get(cached, "second_run_ref_forwards")
    targets.append(
        _target(f"{cached} reference forwards on a second run (same model, data, cache dir) <= 0", forwards, None, 0)
    )
    return targets


def _fmt(value, spec=".3f", none="n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


_STAT_TEXT = {"mean": "mean over one whole epoch (every step)", "median": "median of the measured steps"}


def _model_text(row: dict, settings: dict) -> str:
    """E.g. "SmolLM2-135M-Instruct, real weights (Llama 134.5M params, vocab 49152)", or "Llama 22.7M params, vocab
    32000" for the preset's own random-weight Llama."""
    arch = "Qwen2" if settings.get("arch") == "qwen2" else "Llama"
    text = f"{arch} {row['n_params'] / 1e6:.1f}M params, vocab {settings['vocab_size']}"
    return f"{settings['model_label']} ({text})" if settings.get("model_label") else text


def _row_tokens_text(row: dict) -> str:
    """The mean tokens per row (prompt + completion) as the tokenizer gives them back, next to the drawn mean."""
    if row.get("real_tokens_per_row") is None:
        return ""
    return f" (mean {row['real_tokens_per_row']:.1f} tokens/row re-tokenized, {row['drawn_tokens_per_row']:.1f} drawn)"


def format_table(rows: list[dict], settings: dict, meta: dict) -> str:
    """The per-arm Markdown table, headed by the settings; column headers name the statistic actually used."""
    first = rows[0]
    stat = step_statistic(settings)
    header = (
        f"precision: {'bf16 (autocast)' if settings['bf16'] else 'fp32'} | gradient checkpointing: "
        f"{'on' if settings['gradient_checkpointing'] else 'off'} | device: {first['device']} "
        f"({first['torch_threads']} threads) | model: {_model_text(first, settings)} | batch {settings['batch_size']} "
        f"| prompt {settings['prompt_len'][0]}-"
        f"{settings['prompt_len'][1]} + completion {settings['completion_len'][0]}-{settings['completion_len'][1]} "
        f"tokens{_row_tokens_text(first)} | steps: {settings['warmup_steps']} warm-up + {settings['steps']} measured"
        f" | s/step: {_STAT_TEXT[step_statistic(settings)]}"
        f"{' x ' + str(first['repeats']) + ' repeats' if first['repeats'] > 1 else ''} | load avg at start "
        f"{meta['loadavg_start']}"
    )
    columns = [
        "arm",
        f"{stat} s/step",
        "x SFT",
        "x TRL default",
        f"CPU {stat} s/step",
        "x SFT (CPU)",
        "x TRL default (CPU)",
        f"end-to-end {stat} s/step",
        "one-time s",
        "one-time (steps)",
        "one-time (passes)",
        "2nd run one-time s (passes; ref fwds)",
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
            + (f" (CPU {_fmt(row['one_time_passes_cpu'], '.2f')})" if row.get("one_time_passes_cpu") else "")
            + (
                f" (own {_fmt(row['one_time_own_passes_cpu'], '.2f')})"
                if row.get("one_time_own_passes_cpu") is not None
                else ""
            ),
            (
                f"{_fmt(row['second_run_precompute_s'], '.2f')} ({_fmt(row['second_run_passes'], '.2f')}; "
                f"{row['second_run_ref_forwards']})"
                if row.get("second_run_precompute_s") is not None
                else "-"
            ),
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
    lines.append("")
    lines.append(f"Unit of the reference cache's cost: {PASS_UNIT}.")
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
