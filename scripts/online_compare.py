#!/usr/bin/env python
"""Online KTO vs offline KTO vs TRL's GRPO on the embedded tiny addition task, from the base model (no SFT).

    python scripts/online_compare.py [--quick] [--out results/]

Every method starts from the pretrained tiny base model, is rewarded by the same exact-answer verifier
(`trl_kto_ext.models.tiny.exact_answer_reward`), generates the same number of completions (steps x batch) and takes the same
number of optimizer steps with the same batch size and scheduler (beta 0.1 for both KTOs; GRPO keeps TRL's
defaults):
- online KTO (`OnlineKTOTrainer`): each step samples `num_generations` answers for batch/num_generations prompts from
  the current policy, labels them with the verifier, and takes a KTO step on them;
- offline KTO (`KTOExtTrainer`): the reproduction's data (`reproduction`): the same number of answers
  sampled once from the base model, labelled by the verifier, kept as the right/wrong pairs' rows;
- GRPO (`trl.GRPOTrainer`): the same prompts, generations per prompt and reward function.
The learning rate of each method is picked on seed 0 from the same grid by greedy accuracy on validation prompts taken
from the TRAIN split; the held-out prompts are only evaluated, at the end. Writes online.json and online.png to --out.
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
sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parent),
]  # checkout; reproduction.py

import torch  # noqa: E402
from reproduction import build_preference_data, fresh_copy, sample_completions, train_prompt_split  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402

from trl_kto_ext.models import tiny  # noqa: E402

METHODS = ("online_kto", "offline_kto", "grpo")
LABELS = {"online_kto": "online KTO", "offline_kto": "offline KTO", "grpo": "GRPO (TRL)"}
FULL = dict(steps=200, batch=32, generations=8, val_prompts=100, lr_grid=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3], seeds=[0, 1, 2],
            eval_every=20, beta=0.1)  # fmt: skip
QUICK = dict(steps=4, batch=16, generations=4, val_prompts=16, lr_grid=[1e-4], seeds=[0], eval_every=2, beta=0.1)


class ValCurve(TrainerCallback):
    """Greedy accuracy on the validation prompts every `every` steps; its time is kept out of the wall time."""

    def __init__(self, tokenizer, val, every):
        self.tokenizer, self.val, self.every = tokenizer, val, every
        self.points, self.eval_seconds = [], 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            start = time.perf_counter()
            self.points.append((state.global_step, tiny.greedy_accuracy(model, self.tokenizer, *self.val)))
            self.eval_seconds += time.perf_counter() - start


def common_args(cfg, out, lr, seed):
    return dict(
        output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, per_device_train_batch_size=cfg["batch"], max_steps=cfg["steps"],
        learning_rate=lr, lr_scheduler_type="constant_with_warmup", warmup_steps=0.05, weight_decay=0.0,
        logging_steps=max(1, cfg["steps"] // 20), seed=seed, data_seed=seed,
    )  # fmt: skip


def make_trainer(method, model, tokenizer, data, cfg, out, lr, seed):
    if method == "online_kto":
        from trl_kto_ext import OnlineKTOConfig, OnlineKTOTrainer

        args = OnlineKTOConfig(**common_args(cfg, out, lr, seed), num_generations=cfg["generations"],
                               max_completion_length=5, max_length=64, beta=cfg["beta"], temperature=1.0)  # fmt: skip
        return OnlineKTOTrainer(model=model, reward_funcs=tiny.exact_answer_reward, args=args,
                                train_dataset=data["prompts"], processing_class=tokenizer)  # fmt: skip
    if method == "offline_kto":
        from trl_kto_ext import KTOExtConfig, KTOExtTrainer

        args = KTOExtConfig(**common_args(cfg, out, lr, seed), max_length=64, beta=cfg["beta"])
        return KTOExtTrainer(model=model, args=args, train_dataset=data["kto_rows"][seed], processing_class=tokenizer)
    from trl import GRPOConfig, GRPOTrainer

    # GRPO keeps TRL's defaults for its own loss (beta=0: no reference-KL penalty, TRL's default loss_type).
    args = GRPOConfig(**common_args(cfg, out, lr, seed), num_generations=cfg["generations"], max_completion_length=5,
                      temperature=1.0, top_p=1.0, top_k=0)  # fmt: skip
    return GRPOTrainer(model=model, reward_funcs=tiny.exact_answer_reward, args=args, train_dataset=data["prompts"],
                       processing_class=tokenizer)  # fmt: skip


def run(method, base, tokenizer, data, cfg, lr, seed, val, heldout):
    torch.manual_seed(seed)
    curve = ValCurve(tokenizer, val, cfg["eval_every"])
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer = make_trainer(method, fresh_copy(base), tokenizer, data, cfg, out, lr, seed)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(curve)
        trainer.train()
        seconds = time.perf_counter() - start - curve.eval_seconds
    model = trainer.model.eval()
    model.__dict__.pop("forward", None)  # TRL's fused-LM-head patch (see reproduction.fresh_copy)
    share_key = "online/desirable_share" if method == "online_kto" else "reward"
    samples = [(e["step"], e[share_key]) for e in trainer.state.log_history if share_key in e]
    result = dict(method=method, seed=seed, lr=lr, seconds=round(seconds, 1),
                  val_accuracy=tiny.greedy_accuracy(model, tokenizer, *val),
                  heldout_accuracy=tiny.greedy_accuracy(model, tokenizer, *heldout),
                  val_curve=curve.points, sample_accuracy_curve=samples)  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("curve")}), flush=True)
    return result


def prepare_data(base, tokenizer, cfg, seeds):
    """Prompt dataset (online KTO, GRPO) and, per seed, the offline KTO rows sampled once from the base model."""
    feedback, val = train_prompt_split(None, cfg["val_prompts"], seed=0)
    per_prompt = cfg["steps"] * cfg["batch"] // len(feedback)  # the same number of generated completions
    kto_rows, stats = {}, {}
    for seed in seeds:
        samples = sample_completions(base, tokenizer, feedback, max(per_prompt, 2), temperature=1.0, seed=seed)
        _, kto_rows[seed], stats[seed] = build_preference_data(samples, seed=seed)
        stats[seed]["kto_rows"] = len(kto_rows[seed])
    return {"prompts": tiny.make_prompt_dataset(feedback), "kto_rows": kto_rows, "stats": stats}, val, per_prompt


def plot(results, best, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        runs = [r for r in results if r["method"] == method and r["lr"] == best[method]]
        for i, r in enumerate(runs):
            steps, acc = zip(*r["val_curve"]) if r["val_curve"] else ((), ())
            ax1.plot(
                steps, acc, color=f"C{METHODS.index(method)}", alpha=0.8, label=LABELS[method] if i == 0 else None
            )
            if r["sample_accuracy_curve"]:
                s, a = zip(*r["sample_accuracy_curve"])
                ax2.plot(s, a, color=f"C{METHODS.index(method)}", alpha=0.8, label=LABELS[method] if i == 0 else None)
    ax1.set(xlabel="optimizer step", ylabel="greedy accuracy (validation prompts, train split)", ylim=(0, 1.02))
    ax2.set(xlabel="optimizer step", ylabel="share of right sampled answers", ylim=(0, 1.02))
    ax1.set_title("Greedy accuracy during training (3 seeds)")
    ax2.set_title("Sampled answers (online KTO, GRPO)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (checks the script only)")
    parser.add_argument("--out", default="results", help="folder for online.json and online.png")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    torch.set_num_threads(1)  # the model is tiny: a second thread mostly adds synchronisation on shared cores
    default = tiny.build_tiny_default()
    base, tokenizer = default.load_model().eval(), default.load_tokenizer()
    heldout = tiny.heldout_prompts(16 if args.quick else None)
    start = time.perf_counter()
    data, val, per_prompt = prepare_data(base, tokenizer, cfg, cfg["seeds"])
    results, best = [], {}
    for method in METHODS:
        sweep = [run(method, base, tokenizer, data, cfg, lr, cfg["seeds"][0], val, heldout) for lr in cfg["lr_grid"]]
        best[method] = max(sweep, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]
        results += sweep
        results += [run(method, base, tokenizer, data, cfg, best[method], s, val, heldout) for s in cfg["seeds"][1:]]
    table = {}
    for method in METHODS:
        runs = [r for r in results if r["method"] == method and r["lr"] == best[method]]
        acc = [r["heldout_accuracy"] for r in runs]
        table[method] = dict(lr=best[method], heldout_mean=statistics.fmean(acc), heldout_min=min(acc),
                             heldout_max=max(acc), heldout_per_seed=acc,
                             seconds_mean=statistics.fmean(r["seconds"] for r in runs))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(config=cfg, completions_per_prompt_offline=per_prompt, offline_data=data["stats"],
                   base_heldout_accuracy=tiny.greedy_accuracy(base, tokenizer, *heldout), table=table,
                   runs=results, total_seconds=round(time.perf_counter() - start, 1),
                   torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count())  # fmt: skip
    (out / "online.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, best, out / "online.png")
    print(f"base held-out accuracy: {summary['base_heldout_accuracy']:.2f}")
    print("| method | lr | held-out accuracy, mean (min-max over seeds) | train seconds per run |")
    print("|---|---|---|---|")
    for method, row in table.items():
        print(f"| {LABELS[method]} | {row['lr']:g} | {row['heldout_mean']:.3f} ({row['heldout_min']:.2f}-"
              f"{row['heldout_max']:.2f}) | {row['seconds_mean']:.0f} |")  # fmt: skip
    print(f"wrote {out / 'online.json'} and {out / 'online.png'} in {summary['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
