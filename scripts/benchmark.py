#!/usr/bin/env python
"""Step-time and memory benchmark: KTOExtTrainer against trl.KTOTrainer and an SFT floor.

Every configuration ("arm") trains the same randomly initialised Llama on the same synthetic data, with the same batch
size, sequence lengths, precision, gradient-checkpointing setting and number of steps. Each arm runs in its own
subprocess (this script re-invoked with `--arm NAME --json-out FILE`), so its peak memory is its own:
`resource.getrusage(RUSAGE_SELF).ru_maxrss` in the child, plus `torch.cuda.max_memory_allocated()` on CUDA.

Arms:
    sft             trl.SFTTrainer on the desirable rows (prompt + completion, completion-only loss): the floor
    trl_default     trl.KTOTrainer, its defaults (sequential sampler, live reference model)
    trl_precompute  trl.KTOTrainer, precompute_ref_log_probs=True
    ext_default     KTOExtTrainer, its defaults (shuffled sampler, live reference model)
    ext_cached      KTOExtTrainer, precompute_ref_log_probs=True, kl_pairing="dataset" (shuffled sampler)
    ext_fastest     ext_cached plus kl_subset_size=k (k of the batch's KL rows estimate z0)

Timing: a TrainerCallback records `time.perf_counter()` (wall clock) and `time.process_time()` (this process's CPU
time, all threads) at on_step_begin / on_step_end; the reported s/step is the median of (end - begin) over the steps
after the warm-up ones. That window holds forward, backward and optimizer step; the batch is collated just before it,
so the median of the end-to-end intervals (on_step_end to on_step_end: collation and the trainer's bookkeeping added)
is reported too. On a machine shared with other processes the wall clock mostly measures the scheduler; the CPU time
is the steadier measure there, so every ratio is given on both. One-time costs are reported apart: the time spent in
`trainer._precompute_ref_logps` (reference log-probs cached before training), and, for the arms that cache, one
measured no-gradient forward pass over the whole training set, so that the cache's cost can be read in passes.

Precision and gradient checkpointing are the same for every arm: fp32 and off unless `--bf16` /
`--gradient-checkpointing` are given (TRL's own defaults turn both on; bf16 autocast on a CPU without native bf16
measures its emulation more than the trainers).

Usage:
    OMP_NUM_THREADS=2 python scripts/benchmark.py --out results.json            # full benchmark (22.7M params)
    python scripts/benchmark.py --quick --out quick.json                        # tiny model, 3 steps (tests)
    python scripts/benchmark.py --bf16 --gradient-checkpointing --out on.json   # TRL's own defaults for both
    python scripts/benchmark.py --experimental --repeats 2 --out exp.json      # + `<arm>_compact` arms, twice

Children get OMP_WAIT_POLICY=PASSIVE unless it is set: with OpenMP's default spin-waiting on an oversubscribed machine,
every parallel region waits for a descheduled worker and small kernels ran ~100x slower with 2 threads than with 1.

The orchestrating process deliberately imports neither torch nor transformers: a child started with fork/vfork + exec
inherits the parent's peak RSS in `ru_maxrss`, so the parent stays small.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

# ------------------------------------------------------------------------------------------------------------ arms


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    trainer: str  # "sft" | "trl" | "ext"
    precompute: bool = False
    kl_pairing: str | None = None
    kl_subset: bool = False
    # Passes per optimizer step in theory (gradient checkpointing adds one recomputed forward inside the backward).
    passes: str = ""
    no_grad_forwards: float = 0.0  # no-gradient forwards per step, in units of one batch forward (k/B for a subset)
    # Experimental: score only the completion positions in TRL's fused LM head on CPU too (see `_compact_lm_head`).
    compact_head: bool = False


EXPERIMENTAL_BASES = ("sft", "trl_default", "ext_default", "ext_cached", "ext_fastest")


def experimental_arms(arms: list[Arm]) -> list[Arm]:
    """`<arm>_compact` copies of some arms, with the fused LM head scoring only completion positions (evidence for a
    suggested trainer change; not part of the six-arm comparison)."""
    return [
        replace(arm, name=f"{arm.name}_compact", label=f"{arm.label} + compact LM head", compact_head=True)
        for arm in arms
        if arm.name in EXPERIMENTAL_BASES
    ]


def arms_for(kl_subset_size: int, batch_size: int) -> list[Arm]:
    frac = kl_subset_size / batch_size
    return [
        Arm("sft", "trl.SFTTrainer (desirable rows)", "sft", passes="1 fwd+bwd"),
        Arm(
            "trl_default",
            "trl.KTOTrainer defaults (sequential)",
            "trl",
            passes="1 fwd+bwd + 3 fwd (policy KL, ref KL, ref target)",
            no_grad_forwards=3,
        ),
        Arm(
            "trl_precompute",
            "trl.KTOTrainer precompute_ref_log_probs",
            "trl",
            precompute=True,
            passes="1 fwd+bwd + 1 fwd (policy KL)",
            no_grad_forwards=1,
        ),
        Arm(
            "ext_default",
            "KTOExtTrainer defaults (shuffled)",
            "ext",
            passes="1 fwd+bwd + 3 fwd (policy KL, ref KL, ref target)",
            no_grad_forwards=3,
        ),
        Arm(
            "ext_cached",
            "KTOExtTrainer cached ref, dataset pairing (shuffled)",
            "ext",
            precompute=True,
            kl_pairing="dataset",
            passes="1 fwd+bwd + 1 fwd (policy KL)",
            no_grad_forwards=1,
        ),
        Arm(
            "ext_fastest",
            f"KTOExtTrainer cached + kl_subset_size={kl_subset_size}",
            "ext",
            precompute=True,
            kl_pairing="dataset",
            kl_subset=True,
            passes=f"1 fwd+bwd + {kl_subset_size}/{batch_size} fwd (policy KL)",
            no_grad_forwards=frac,
        ),
    ]


def forward_equivalents(arm: Arm, gradient_checkpointing: bool) -> float:
    """Cost of a step in batch-forward units, taking a backward as two forwards (plus one recompute with GC)."""
    return 3.0 + (1.0 if gradient_checkpointing else 0.0) + arm.no_grad_forwards


# ---------------------------------------------------------------------------------------------------- settings

PRESETS = {
    # ~1M parameters: a smoke test of every arm, not a measurement.
    "quick": dict(
        vocab_size=4096,
        hidden_size=96,
        num_layers=2,
        num_heads=4,
        intermediate_size=192,
        prompt_len=(8, 16),
        completion_len=(4, 12),
        max_length=64,
        warmup_steps=1,
        steps=2,
    ),
    "full": dict(
        vocab_size=32000,
        hidden_size=256,
        num_layers=6,
        num_heads=4,
        intermediate_size=1024,
        prompt_len=(48, 96),
        completion_len=(32, 128),
        max_length=256,
        warmup_steps=2,
        steps=8,
    ),
}


def settings_from_args(args) -> dict:
    preset = dict(PRESETS["quick" if args.quick else "full"])
    if args.steps is not None:
        preset["steps"] = args.steps
    if args.warmup_steps is not None:
        preset["warmup_steps"] = args.warmup_steps
    total_steps = preset["warmup_steps"] + preset["steps"]
    return dict(
        preset,
        mode="quick" if args.quick else "full",
        batch_size=args.batch_size,
        kl_subset_size=args.kl_subset_size,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        threads=args.threads,
        total_steps=total_steps,
        n_rows=2 * math.ceil(args.batch_size * total_steps / 2),  # one epoch of the KTO data covers every step
    )


# ------------------------------------------------------------------------------------------------- child: data


def build_tokenizer(vocab_size: int):
    """WordLevel tokenizer over synthetic words "w0", "w1", ... split on whitespace, with pad/bos/eos/unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokens = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    backend = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=1 << 16,
    )


def build_rows(settings: dict) -> dict[str, list]:
    """Prompt/completion/label columns of random words, exactly half desirable.

    Lengths are drawn uniformly in the preset's ranges once per pair of rows, and each pair gives one desirable and one
    undesirable row: the desirable rows alone (the SFT arm's data, two epochs of it) hold the same tokens as the whole
    KTO set, so every arm trains on the same number of tokens."""
    import random

    rng = random.Random(settings["seed"])
    n_words = settings["vocab_size"] - 4
    n = settings["n_rows"]

    def words(length):
        return " ".join(f"w{rng.randrange(n_words)}" for _ in range(length))

    examples = []
    for _ in range(n // 2):
        prompt_len, completion_len = rng.randint(*settings["prompt_len"]), rng.randint(*settings["completion_len"])
        for label in (True, False):
            examples.append((words(prompt_len), " " + words(completion_len), label))
    rng.shuffle(examples)
    return {
        "prompt": [e[0] for e in examples],
        "completion": [e[1] for e in examples],
        "label": [e[2] for e in examples],
    }


def build_model(settings: dict, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings["hidden_size"],
        num_hidden_layers=settings["num_layers"],
        num_attention_heads=settings["num_heads"],
        num_key_value_heads=settings["num_heads"],
        intermediate_size=settings["intermediate_size"],
        max_position_embeddings=max(512, settings["max_length"]),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(settings["seed"])
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ------------------------------------------------------------------------------------------ child: measurement


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _timed_method(cls, name: str, store: list[tuple[float, float]]) -> None:
    """Wraps `cls.<name>` (as defined on `cls` itself) to append each call's (wall, CPU) seconds to `store`."""
    original = cls.__dict__[name]

    def wrapper(self, *args, **kwargs):
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            store.append((time.perf_counter() - start, time.process_time() - start_cpu))

    setattr(cls, name, wrapper)


def _record_collated(collator, store: list[dict]):
    """Records the padded and real token counts of every batch the collator builds from now on."""
    original = collator.torch_call

    def torch_call(examples):
        batch = original(examples)
        entry = {}
        if "input_ids" in batch:
            entry["padded_tokens"] = int(batch["input_ids"].numel())
            mask = batch.get("attention_mask")
            entry["tokens"] = int(mask.sum()) if mask is not None else entry["padded_tokens"]
        if "KL_input_ids" in batch:
            entry["kl_padded_tokens"] = int(batch["KL_input_ids"].numel())
        store.append(entry)
        return batch

    collator.torch_call = torch_call
    return original


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward_pass(trainer, collate_fn, batch_size: int, sort_by_length: bool = False) -> dict:
    """One no-gradient forward of the target rows of the whole training set, as the reference precompute runs it
    (`compute_ref_log_probs` with the KL rows switched off), timed batch by batch; collation is not timed.
    `sort_by_length` batches rows of similar length together (less padding), as a length-sorted precompute would."""
    from torch.utils.data import DataLoader

    device = trainer.accelerator.device
    dataset = trainer.train_dataset
    if sort_by_length:
        lengths = [len(p) + len(c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"])]
        dataset = dataset.select(sorted(range(len(lengths)), key=lengths.__getitem__))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, shuffle=False)
    model = trainer.model
    was_training = model.training
    model.eval()
    saved = trainer.calculate_KL
    trainer.calculate_KL = False
    per_batch, per_batch_cpu = [], []
    try:
        for batch in loader:
            batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer.compute_ref_log_probs(model, batch)
            _sync(device)
            per_batch.append(time.perf_counter() - start)
            per_batch_cpu.append(time.process_time() - start_cpu)
    finally:
        trainer.calculate_KL = saved
        model.train(was_training)
    return {
        "one_pass_fwd_s": sum(per_batch),
        "one_pass_fwd_cpu_s": sum(per_batch_cpu),
        "fwd_batch_s": per_batch,
        "n_batches": len(per_batch),
    }


def _compact_lm_head() -> None:
    """Makes TRL's fused LM head project only the positions with a label (the completion tokens), as it already does
    on CUDA/XPU with Triton; off Triton it projects every position, prompt and padding included. `_use_triton` is read
    at call time by `add_fused_lm_head`'s forward only to choose that path (the kernels module keeps its own copy)."""
    import trl.trainer.utils as trl_utils

    trl_utils._use_triton = lambda device: True


def run_arm(arm: Arm, settings: dict) -> dict:
    import torch

    torch.set_num_threads(settings["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    if arm.compact_head:
        _compact_lm_head()
    tokenizer = build_tokenizer(settings["vocab_size"])
    rows = build_rows(settings)
    model = build_model(settings, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    rss_model = _rss_mb()

    class StepTimer(TrainerCallback):
        """Wall clock (perf_counter) and this process's CPU time (all threads) at each step's begin and end."""

        def __init__(self):
            self.begin, self.end, self.begin_cpu, self.end_cpu = [], [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.begin.append(time.perf_counter())
            self.begin_cpu.append(time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.end.append(time.perf_counter())
            self.end_cpu.append(time.process_time())

    timer = StepTimer()
    precompute_times: list[tuple[float, float]] = []
    output_dir = tempfile.mkdtemp(prefix=f"kto-bench-{arm.name}-")
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=settings["batch_size"],
        max_steps=settings["total_steps"],
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        logging_steps=settings["total_steps"],  # log once, after the last step
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=settings["seed"],
        bf16=settings["bf16"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        use_cpu=not cuda,
        max_length=settings["max_length"],
    )

    start = time.perf_counter()
    if arm.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        desirable = [i for i, label in enumerate(rows["label"]) if label]
        dataset = Dataset.from_dict(
            {
                "prompt": [rows["prompt"][i] for i in desirable],
                "completion": [rows["completion"][i] for i in desirable],
            }
        )
        config = SFTConfig(**common, completion_only_loss=True, packing=False)
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
        )
    elif arm.trainer == "trl":
        import copy

        from trl import KTOConfig, KTOTrainer

        if arm.precompute:
            _timed_method(KTOTrainer, "_precompute_ref_logps", precompute_times)
        config = KTOConfig(**common, beta=0.1, precompute_ref_log_probs=arm.precompute)
        # TRL reloads the reference from `model.config._name_or_path`, which a model built in memory does not have:
        # pass a copy (what it would load). With a precomputed reference TRL keeps none.
        ref_model = None if arm.precompute else copy.deepcopy(model).eval().requires_grad_(False)
        trainer = KTOTrainer(
            model=model,
            ref_model=ref_model,
            args=config,
            train_dataset=Dataset.from_dict(rows),
            processing_class=tokenizer,
            callbacks=[timer],
        )
    else:
        from trl_kto_ext import KTOExtConfig, KTOExtTrainer

        if arm.precompute:
            _timed_method(KTOExtTrainer, "_precompute_ref_logps", precompute_times)
        extra = {}
        if arm.kl_pairing is not None:
            extra["kl_pairing"] = arm.kl_pairing
        if arm.kl_subset:
            extra["kl_subset_size"] = settings["kl_subset_size"]
        config = KTOExtConfig(**common, beta=0.1, precompute_ref_log_probs=arm.precompute, **extra)
        trainer = KTOExtTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_dict(rows),
            processing_class=tokenizer,
            callbacks=[timer],
        )
    construct_s = time.perf_counter() - start
    rss_init = _rss_mb()

    batches: list[dict] = []
    original_collate = _record_collated(trainer.data_collator, batches)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    rss_train = _rss_mb()
    cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    warm = settings["warmup_steps"]
    step_s = [e - b for b, e in zip(timer.begin, timer.end)]
    cpu_step_s = [e - b for b, e in zip(timer.begin_cpu, timer.end_cpu)]
    wall_s = [timer.end[i] - timer.end[i - 1] for i in range(max(warm, 1), len(timer.end))]
    measured = step_s[warm:]
    measured_batches = batches[warm : len(step_s)]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    result = dict(
        arm=arm.name,
        label=arm.label,
        passes=arm.passes,
        fwd_equivalents=forward_equivalents(arm, settings["gradient_checkpointing"]),
        n_params=n_params,
        n_rows=len(trainer.train_dataset),
        steps_run=len(step_s),
        step_s=step_s,
        median_step_s=statistics.median(measured) if measured else float("nan"),
        cpu_step_s=cpu_step_s,
        median_cpu_step_s=statistics.median(cpu_step_s[warm:]) if measured else float("nan"),
        wall_step_s=wall_s,
        median_wall_step_s=statistics.median(wall_s) if wall_s else float("nan"),
        construct_s=construct_s,
        precompute_s=sum(t[0] for t in precompute_times) if arm.precompute else 0.0,
        precompute_cpu_s=sum(t[1] for t in precompute_times) if arm.precompute else 0.0,
        train_s=train_s,
        tokens_per_step=_mean(b.get("tokens") for b in measured_batches),
        padded_tokens_per_step=_mean(b.get("padded_tokens") for b in measured_batches),
        kl_padded_tokens_per_step=_mean(b.get("kl_padded_tokens") for b in measured_batches),
        final_loss=losses[-1] if losses else float("nan"),
        rss_after_model_mb=rss_model,
        rss_after_init_mb=rss_init,
        peak_rss_mb=rss_train,
        cuda_peak_mb=cuda_peak_mb,
        device=str(device),
        loadavg_end=_loadavg(),
        torch_threads=torch.get_num_threads(),
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    )
    if arm.precompute:
        batch_size = trainer.args.precompute_ref_batch_size or trainer.args.per_device_train_batch_size
        result.update(time_forward_pass(trainer, original_collate, batch_size))
        if arm.name == "ext_cached":
            # Evidence for a length-sorted precompute: the same pass with rows batched by length.
            sorted_pass = time_forward_pass(trainer, original_collate, batch_size, sort_by_length=True)
            result["one_pass_sorted_fwd_s"] = sorted_pass["one_pass_fwd_s"]
            result["one_pass_sorted_fwd_cpu_s"] = sorted_pass["one_pass_fwd_cpu_s"]
    return result


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------- parent: reporting


def _ratio(a, b):
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def summarise(runs: dict[str, list[dict]], arms: list[Arm]) -> list[dict]:
    """One row per arm; with several repeats the step times of all repeats are pooled before the median."""
    rows = []
    for arm in arms:
        results = runs.get(arm.name) or []
        if not results:
            continue
        warm = results[0]["_warmup_steps"]
        pooled = [t for r in results for t in r["step_s"][warm:]]
        pooled_wall = [t for r in results for t in r["wall_step_s"]]
        pooled_cpu = [t for r in results for t in r["cpu_step_s"][warm:]]
        row = dict(results[0])
        row.pop("_warmup_steps", None)
        row.update(
            repeats=len(results),
            median_step_s=statistics.median(pooled) if pooled else float("nan"),
            median_wall_step_s=statistics.median(pooled_wall) if pooled_wall else float("nan"),
            median_cpu_step_s=statistics.median(pooled_cpu) if pooled_cpu else float("nan"),
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


# ---------------------------------------------------------------------------------------------------------- main


def _child_command(args, arm_name: str, json_out: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--arm", arm_name, "--json-out", json_out]
    cmd += ["--batch-size", str(args.batch_size), "--kl-subset-size", str(args.kl_subset_size)]
    cmd += ["--seed", str(args.seed), "--threads", str(args.threads)]
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
    if any(row["arm"].endswith("_compact") for row in rows):
        targets += check_targets(rows, suffix="_compact")
    table = format_table(rows, settings, meta)
    print()
    print(table)
    print()
    print(format_targets(targets))
    print(
        f"\ntotal {meta['total_s']:.0f} s; load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}"
    )
    if args.out:
        raw = {name: [{k: v for k, v in r.items() if k != "_warmup_steps"} for r in rs] for name, rs in runs.items()}
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
    arms = {arm.name: arm for arm in arms + experimental_arms(arms)}
    if args.arm not in arms:
        raise SystemExit(f"unknown arm {args.arm!r}; choose from {', '.join(arms)}")
    result = run_arm(arms[args.arm], settings)
    result["settings"] = settings
    with open(args.json_out or f"{args.arm}.json", "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
