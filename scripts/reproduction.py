"""Pieces of the CPU-sized reproduction of the KTO paper's claims (used by scripts/reproduce.py).

Task: the embedded tiny addition model (`trl_kto_ext.models.tiny`). Feedback comes from the task itself: completions sampled
from the base model for train-split prompts are labelled by checking the answer; DPO pairs (one right, one wrong
completion of the same prompt) and KTO rows (the two rows of every pair, unpaired) hold the same completions.
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from trl_kto_ext.data.loading import subsample_class, unpair_paired_dataset
from trl_kto_ext.logprobs.reference import frozen_copy
from trl_kto_ext.models.tiny import greedy_accuracy, heldout_prompts, is_correct, make_paired_dataset

# Arm name -> (model it starts from, training method, extra KTOExtConfig fields, desirable_fraction).
ARMS: dict[str, tuple[str | None, str | None, dict[str, Any], float]] = {
    "base": (None, None, {}, 1.0),
    "sft": ("base", "sft", {}, 1.0),
    "dpo": ("sft", "dpo", {}, 1.0),
    "kto": ("sft", "kto", {}, 1.0),
    "kto_d10": ("sft", "kto", {}, 0.1),
    "kto_nosft": ("base", "kto", {}, 1.0),
    "kto_d10_nosft": ("base", "kto", {}, 0.1),  # claims 2 and 3 together
    "dpo_nosft": ("base", "dpo", {}, 1.0),  # control for claim 3: does DPO also do without SFT here?
    "kto_fast": ("sft", "kto", {"precompute_ref_log_probs": True, "kl_pairing": "dataset", "kl_subset_size": 2}, 1.0),
}
ARM_SHORT = {
    "base": "base",
    "sft": "SFT",
    "dpo": "SFT+DPO",
    "kto": "SFT+KTO",
    "kto_d10": "SFT+KTO\n10% desirable",
    "kto_nosft": "KTO\n(no SFT)",
    "kto_d10_nosft": "KTO 10% des.\n(no SFT)",
    "dpo_nosft": "DPO\n(no SFT)",
    "kto_fast": "SFT+KTO\nfast",
}
ARM_LABELS = {
    "base": "Base (pretrained, no alignment)",
    "sft": "SFT",
    "dpo": "SFT + DPO",
    "kto": "SFT + KTO",
    "kto_d10": "SFT + KTO, 90% of desirable dropped (auto lambda)",
    "kto_nosft": "KTO straight from base (no SFT)",
    "kto_d10_nosft": "KTO from base, 90% of desirable dropped (auto lambda)",
    "dpo_nosft": "DPO straight from base (no SFT; control)",
    "kto_fast": "SFT + KTO fast settings",
}


@dataclass
class RunResult:
    arm: str
    seed: int
    lr: float
    val_accuracy: float
    heldout_accuracy: float
    seconds: float
    model: torch.nn.Module | None = None
    log_history: list[dict] | None = None
    lambdas: tuple[float, float] | None = None


# ------------------------------------------------------------------------------------------------------ prompts
def train_prompt_split(
    n_feedback: int | None, n_val: int, seed: int = 0, draws: int = 50_000
) -> tuple[list[str], tuple[list[str], list[str]]]:
    """Disjoint (feedback prompts, (validation prompts, answers)) from the train split of `tiny`, never a held-out
    prompt. Prompts are collected through `make_paired_dataset` (its chosen completion is the right answer) and
    shuffled with `seed`; `n_feedback=None` takes every train prompt left after the validation ones."""
    rows = make_paired_dataset(draws, seed=0, split="train")
    answer = dict(zip(rows["prompt"], rows["chosen"]))
    heldout = set(heldout_prompts()[0])
    prompts = sorted(p for p in answer if p not in heldout)  # the order depends only on the set of train prompts
    random.Random(seed).shuffle(prompts)
    n_feedback = len(prompts) - n_val if n_feedback is None else n_feedback
    if n_feedback < 1 or n_feedback + n_val > len(prompts):
        raise ValueError(f"asked for {n_feedback}+{n_val} distinct train prompts; the train split has {len(prompts)}")
    val = prompts[:n_val]
    return prompts[n_val : n_val + n_feedback], (val, [answer[p] for p in val])


# ------------------------------------------------------------------------------------------------ feedback data
@torch.no_grad()
def sample_completions(
    model, tokenizer, prompts: list[str], n_samples: int, temperature: float, seed: int, batch_size: int = 128
) -> list[dict[str, Any]]:
    """`n_samples` temperature samples per prompt, labelled desirable iff the answer is right (`is_correct`)."""
    model.eval()
    torch.manual_seed(seed)
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer(p)["input_ids"] for p in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            num_return_sequences=n_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in enumerate(texts):
            prompt, completion = chunk[i // n_samples], text.strip()
            if completion:  # an immediate EOS gives an empty completion: not a usable row
                rows.append({"prompt": prompt, "completion": completion, "correct": is_correct(prompt, completion)})
    return rows


def build_preference_data(samples: list[dict[str, Any]], seed: int = 0) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """(DPO pairs, KTO rows, stats). One pair per prompt that has both a right and a wrong sample: a right one as
    chosen, a random wrong one as rejected. The KTO rows are exactly the two rows of every pair, unpaired."""
    rng = random.Random(seed)
    by_prompt: dict[str, dict[bool, list[str]]] = defaultdict(lambda: {True: [], False: []})
    for row in samples:
        by_prompt[row["prompt"]][row["correct"]].append(row["completion"])
    pairs: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for prompt, group in by_prompt.items():
        if group[True] and group[False]:
            pairs["prompt"].append(prompt)
            pairs["chosen"].append(rng.choice(group[True]))
            pairs["rejected"].append(rng.choice(group[False]))
    paired = Dataset.from_dict(pairs)
    stats = {
        "samples": len(samples),
        "sample_accuracy": sum(r["correct"] for r in samples) / max(len(samples), 1),
        "prompts": len(by_prompt),
        "pairs": len(paired),
        "prompts_all_right": sum(bool(g[True]) and not g[False] for g in by_prompt.values()),
        "prompts_all_wrong": sum(bool(g[False]) and not g[True] for g in by_prompt.values()),
    }
    return paired, unpair_paired_dataset(paired, seed=seed), stats


# ------------------------------------------------------------------------------------------------------ training
def _common_args(cfg: dict, output_dir: str, lr: float, seed: int, batch_size: int) -> dict[str, Any]:
    steps = int(cfg["steps"])
    return dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, round(float(cfg.get("warmup_fraction", 0.1)) * steps)),
        weight_decay=0.0,
        logging_steps=max(1, steps // int(cfg.get("log_points", 25))),
        seed=seed,
        data_seed=seed,
    )


def fresh_copy(model):
    """A deep copy that runs on its own weights. The trainers patch `model.forward` (TRL's fused LM head) with a
    closure over the *original* bound forward; a deep copy keeps that closure, so without this the copy's plain
    forward (and `generate`) would silently run the original model's weights."""
    clone = copy.deepcopy(model)
    clone.__dict__.pop("forward", None)  # back to the class's forward; the next trainer patches its own copy
    return clone


def train_one(
    method: str, model, tokenizer, pairs: Dataset, kto_rows: Dataset, lr: float, seed: int, cfg: dict, **kto
):
    """Trains `model` in place with SFT / DPO / KTO on the shared feedback data; returns (model, log, lambdas)."""
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from trl_kto_ext.config import KTOExtConfig
    from trl_kto_ext.trainer import KTOExtTrainer

    n = int(cfg["completions_per_step"])  # every method sees this many completions per optimizer step
    lambdas = None
    with tempfile.TemporaryDirectory() as out:
        if method == "sft":
            data = Dataset.from_dict({"prompt": pairs["prompt"], "completion": pairs["chosen"]})
            args = SFTConfig(**_common_args(cfg, out, lr, seed, n), max_length=64)
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        elif method == "dpo":
            args = DPOConfig(**_common_args(cfg, out, lr, seed, n // 2), beta=float(cfg["beta"]), max_length=64)
            trainer = DPOTrainer(
                model=model, ref_model=frozen_copy(model), args=args, train_dataset=pairs, processing_class=tokenizer
            )
        elif method == "kto":
            fraction = kto.pop("desirable_fraction", 1.0)
            rows = kto_rows if fraction >= 1 else subsample_class(kto_rows, desirable_fraction=fraction, seed=seed)
            args = KTOExtConfig(**_common_args(cfg, out, lr, seed, n), beta=float(cfg["beta"]), max_length=64, **kto)
            ref = None if args.precompute_ref_log_probs else frozen_copy(model)
            trainer = KTOExtTrainer(
                model=model, ref_model=ref, args=args, train_dataset=rows, processing_class=tokenizer
            )
            lambdas = (float(trainer.desirable_weight), float(trainer.undesirable_weight))
        else:
            raise ValueError(f"unknown method {method!r}")
        trainer.remove_callback(PrinterCallback)  # the per-step log dicts would flood the output
        trainer.train()
        history = list(trainer.state.log_history)
    model = trainer.model.eval()
    model.__dict__.pop("forward", None)  # drop the fused-LM-head patch (see `fresh_copy`)
    del trainer
    return model, history, lambdas


def run_arm(
    arm: str, start_model, tokenizer, pairs, kto_rows, lr: float, seed: int, cfg: dict, val, heldout
) -> RunResult:
    """One training run of `arm` from a copy of `start_model`, evaluated on the validation and held-out prompts."""
    _, method, kto_fields, fraction = ARMS[arm]
    t0 = time.perf_counter()
    model = fresh_copy(start_model)
    history, lambdas = [], None
    if method is not None:
        extra = dict(kto_fields, desirable_fraction=fraction) if method == "kto" else {}
        torch.manual_seed(seed)
        model, history, lambdas = train_one(method, model, tokenizer, pairs, kto_rows, lr, seed, cfg, **extra)
    val_acc = greedy_accuracy(model, tokenizer, *val)
    held_acc = greedy_accuracy(model, tokenizer, *heldout)
    seconds = time.perf_counter() - t0
    return RunResult(arm, seed, lr, val_acc, held_acc, seconds, model, history, lambdas)
