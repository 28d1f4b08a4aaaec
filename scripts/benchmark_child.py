"""The child side of scripts/benchmark.py: one arm trained and measured in its own process."""

from __future__ import annotations

import statistics
import tempfile
import time

from benchmark_real import row_token_counts
from benchmark_report import _loadavg
from benchmark_setup import Arm, build_data, build_model, forward_equivalents

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


def time_forward_pass(trainer, collate_fn, batch_size: int, sort_by_length: bool = False, own: bool = False) -> dict:
    """One no-gradient forward of the target rows of the whole training set, as TRL's reference precompute runs it
    (`KTOTrainer.compute_ref_log_probs` with the KL rows switched off), timed batch by batch; collation is not timed.
    `sort_by_length` batches rows of similar length together (less padding), as a length-sorted precompute would.
    `own`: the same batches through KTOExtTrainer's fast path (`FastPath.sequence_logps`) instead of TRL's."""
    from torch.utils.data import DataLoader
    from trl import KTOTrainer

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
            if own:
                from trl_kto_ext.logprobs.fast_path import fast_path

                with trainer.accelerator.autocast():
                    keys = ("input_ids", "attention_mask", "completion_mask")
                    assert fast_path(trainer).sequence_logps(model, batch, keys) is not None, "fast path off"
            else:
                KTOTrainer.compute_ref_log_probs(trainer, model, batch)
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
    tokenizer, rows = build_data(settings)
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
        if arm.packed:
            extra["pack_no_grad_passes"] = True
        # a fresh reference cache: the measured precompute is a miss, as on a first run
        extra["ref_cache_dir"] = tempfile.mkdtemp(prefix=f"kto-bench-refcache-{arm.name}-")
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
    aggregate = statistics.mean if settings.get("aggregate") == "mean" else statistics.median
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
        median_step_s=aggregate(measured) if measured else float("nan"),
        cpu_step_s=cpu_step_s,
        median_cpu_step_s=aggregate(cpu_step_s[warm:]) if measured else float("nan"),
        wall_step_s=wall_s,
        median_wall_step_s=aggregate(wall_s) if wall_s else float("nan"),
        construct_s=construct_s,
        precompute_s=sum(t[0] for t in precompute_times) if arm.precompute else 0.0,
        precompute_cpu_s=sum(t[1] for t in precompute_times) if arm.precompute else 0.0,
        train_s=train_s,
        tokens_per_step=_mean(b.get("tokens") for b in measured_batches),
        padded_tokens_per_step=_mean(b.get("padded_tokens") for b in measured_batches),
        kl_padded_tokens_per_step=_mean(b.get("kl_padded_tokens") for b in measured_batches),
        **row_token_counts(rows, tokenizer),  # mean tokens per row (prompt + completion): drawn, and re-tokenized
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
        if arm.trainer == "ext":
            own_pass = time_forward_pass(trainer, original_collate, batch_size, own=True)
            result["one_pass_own_fwd_s"] = own_pass["one_pass_fwd_s"]
            result["one_pass_own_fwd_cpu_s"] = own_pass["one_pass_fwd_cpu_s"]
            result.update(second_run(settings, tokenizer, rows, config, precompute_times))
    return result


def second_run(settings: dict, tokenizer, rows: dict, config, precompute_times: list) -> dict:
    """A second `KTOExtTrainer` on the same initial weights (rebuilt from the same seed), data and reference cache
    directory, as a learning-rate sweep's next job would be: its one-time reference cost (wall and CPU seconds spent
    in `_precompute_ref_logps`, hashing and reading included) and the number of forward calls of its model then."""
    from datasets import Dataset

    from trl_kto_ext import KTOExtTrainer

    model = build_model(settings, tokenizer)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    before = len(precompute_times)
    try:
        KTOExtTrainer(model=model, args=config, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer)
    finally:
        hook.remove()
    times = precompute_times[before:]
    return dict(
        second_run_precompute_s=sum(t[0] for t in times),
        second_run_precompute_cpu_s=sum(t[1] for t in times),
        second_run_ref_forwards=len(calls),
    )


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
