#!/usr/bin/env python
"""Two-digit addition on SmolLM2-135M-Instruct (no SFT): base model vs online KTO vs offline KTO vs TRL's GRPO.

    python scripts/real_task.py [--quick] [--seeds 0 1] [--out results/real_task]
    python scripts/real_task.py data [FOLDER]     # the files of configs/smollm2-*.yaml
    python scripts/real_task.py eval [OUTPUT_DIR] # held-out accuracy of a trained folder

The task: "What is a+b? Answer with the number only." for 10 <= a, b <= 99, in the model's own chat template (its
default system turn included); a verifier reads the last number of the answer. The 8,100 operand pairs are split
once (fixed seed): TEST_SIZE held-out prompts that no arm samples or trains on, VAL_SIZE validation prompts that pick
each method's learning rate, the rest to train on. Every arm starts from the same converted model with the same
LoRA adapters and generates the same number of completions (steps x batch), with the same sampling settings:
- online KTO (`OnlineKTOTrainer`): each step samples `generations` answers to batch/generations train prompts from
  the current policy, the verifier labels them, KTO trains on them (defaults: one-class prompts left out, auto lambda);
- offline KTO (`KTOExtTrainer`): as many answers sampled once from the base model for other train prompts, labelled
  by the verifier, trained on for the same number of steps and batch size (one epoch);
- GRPO (`trl.GRPOTrainer`, TRL's defaults for its own loss: beta 0, its default loss type): the same prompts,
  generations per prompt, verifier and sampling settings as online KTO.
The learning rate of each method is the best of LR_GRID by greedy accuracy on the validation prompts (first seed);
then every seed is evaluated on the held-out prompts. Writes real_task.json and real_task.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trl_kto_ext.training.library_messages import quiet_library_logs  # noqa: E402

quiet_library_logs()  # before peft imports bitsandbytes (its request to install `kernels`, which nothing here uses)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, PrinterCallback  # noqa: E402

from trl_kto_ext.models.smollm2 import addition_reward, build_smollm2, last_number  # noqa: E402

METHODS = ("online_kto", "offline_kto", "grpo")
LABELS = {"base": "base model", "online_kto": "online KTO", "offline_kto": "offline KTO", "grpo": "GRPO (TRL)"}
TEST_SIZE, VAL_SIZE, SPLIT_SEED = 200, 64, 1234
FULL = dict(steps=24, prompts_per_step=4, generations=4, max_completion_length=16, temperature=0.5, beta=0.1,
            lr_grid=[3e-5, 1e-4, 3e-4], lora_r=16, test_size=TEST_SIZE, val_size=VAL_SIZE, dtype="float32")  # fmt: skip
QUICK = dict(steps=2, prompts_per_step=2, generations=2, max_completion_length=16, temperature=0.5, beta=0.1,
             lr_grid=[3e-4], lora_r=8, test_size=8, val_size=8, dtype="float32")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ task
def question(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a}+{b}? Answer with the number only."}]


def splits() -> dict[str, list[tuple[int, int]]]:
    """Operand pairs: "test" (held out), "val" (learning-rate choice), "train"; fixed, whatever the run's seed."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(SPLIT_SEED).shuffle(pairs)
    return {
        "test": pairs[:TEST_SIZE],
        "val": pairs[TEST_SIZE : TEST_SIZE + VAL_SIZE],
        "train": pairs[TEST_SIZE + VAL_SIZE :],
    }


def prompt_dataset(pairs) -> Dataset:
    return Dataset.from_dict({"prompt": [question(a, b) for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})


@torch.no_grad()
def generate(model, tokenizer, pairs, max_new_tokens, n=1, temperature=None, batch_size=32, seed=0) -> list[str]:
    """Completions (text) for each pair: greedy when `temperature` is None, else `n` samples each (pair-major)."""
    model.eval()
    torch.manual_seed(seed)
    texts = []
    for start in range(0, len(pairs), batch_size):
        chats = [question(a, b) for a, b in pairs[start : start + batch_size]]
        inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, padding_side="left",
                                               return_tensors="pt", return_dict=True)  # fmt: skip
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature else {"do_sample": False}
        )
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_return_sequences=n,
                             pad_token_id=tokenizer.pad_token_id, **sampling)  # fmt: skip
        texts += tokenizer.batch_decode(out[:, inputs["input_ids"].size(1) :], skip_special_tokens=True)
    return texts


def accuracy(model, tokenizer, pairs, cfg) -> float:
    texts = generate(model, tokenizer, pairs, cfg["max_completion_length"])
    return sum(last_number(t) == a + b for t, (a, b) in zip(texts, pairs)) / len(pairs)


# ------------------------------------------------------------------------------------------------------- trainers
def lora(cfg) -> LoraConfig:
    return LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip


def load_base(smol, cfg):
    return AutoModelForCausalLM.from_pretrained(smol.model_dir, dtype=getattr(torch, cfg["dtype"]))


def common_args(cfg, out, lr, seed) -> dict:
    return dict(
        output_dir=out, use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, per_device_train_batch_size=cfg["prompts_per_step"] *
        cfg["generations"], max_steps=cfg["steps"], learning_rate=lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.1, weight_decay=0.0, logging_steps=1, seed=seed, data_seed=seed,
        model_init_kwargs={"dtype": cfg["dtype"]},
    )  # fmt: skip


def make_trainer(method, model_dir, tokenizer, data, cfg, out, lr, seed):
    sampling = dict(num_generations=cfg["generations"], max_completion_length=cfg["max_completion_length"],
                    temperature=cfg["temperature"], top_p=1.0, top_k=0)  # fmt: skip
    if method == "online_kto":
        from trl_kto_ext import OnlineKTOConfig, OnlineKTOTrainer

        args = OnlineKTOConfig(**common_args(cfg, out, lr, seed), **sampling, beta=cfg["beta"], max_length=128)
        return OnlineKTOTrainer(model_dir, reward_funcs=addition_reward, args=args, train_dataset=data["prompts"],
                                processing_class=tokenizer, peft_config=lora(cfg))  # fmt: skip
    if method == "offline_kto":
        from trl_kto_ext import KTOExtConfig, KTOExtTrainer

        args = KTOExtConfig(**common_args(cfg, out, lr, seed), beta=cfg["beta"], max_length=128)
        return KTOExtTrainer(model_dir, args=args, train_dataset=data["kto_rows"][seed], processing_class=tokenizer,
                             peft_config=lora(cfg))  # fmt: skip
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**common_args(cfg, out, lr, seed), **sampling)  # TRL's defaults for the GRPO loss itself
    return GRPOTrainer(model_dir, reward_funcs=addition_reward, args=args, train_dataset=data["prompts"],
                       processing_class=tokenizer, peft_config=lora(cfg))  # fmt: skip


def run(method, smol, tokenizer, data, cfg, lr, seed, pairs, out: Path) -> dict:
    """Trains one arm, saves its adapters under `out`, returns its validation accuracy, time and sampling curve."""
    start = time.perf_counter()
    trainer = make_trainer(method, smol.model_dir, tokenizer, data, cfg, str(out / "trainer"), lr, seed)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(out / "adapter")
    model = trainer.model.eval()
    key = "reward" if method == "grpo" else "online/desirable_share"
    curve = [(e["step"], e[key]) for e in trainer.state.log_history if key in e]
    skipped = sum(e.get("skipped/no_preference_steps", 0) for e in trainer.state.log_history)
    result = dict(method=method, seed=seed, lr=lr, seconds=round(seconds, 1), skipped_steps=skipped,
                  val_accuracy=accuracy(model, tokenizer, pairs["val"], cfg), sample_accuracy_curve=curve,
                  adapter=str(out / "adapter"))  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "sample_accuracy_curve"}), flush=True)
    return result


def offline_rows(smol, tokenizer, pairs, cfg, seed) -> tuple[Dataset, dict]:
    """The base model's own answers to steps x prompts_per_step train prompts (other prompts than online's first
    ones), `generations` each, sampled as online, labelled by the verifier: the same number of completions."""
    rng = random.Random(seed)
    chosen = rng.sample(pairs["train"], cfg["steps"] * cfg["prompts_per_step"])
    model = load_base(smol, cfg).eval()
    start = time.perf_counter()
    texts = generate(model, tokenizer, chosen, cfg["max_completion_length"], n=cfg["generations"],
                     temperature=cfg["temperature"], seed=seed)  # fmt: skip
    rows = {"prompt": [], "completion": [], "label": []}
    for i, text in enumerate(texts):
        a, b = chosen[i // cfg["generations"]]
        rows["prompt"].append(question(a, b))
        rows["completion"].append([{"role": "assistant", "content": text}])
        rows["label"].append(last_number(text) == a + b)
    stats = dict(rows=len(texts), desirable=sum(rows["label"]), seconds=round(time.perf_counter() - start, 1))
    print(json.dumps({"offline_data": stats, "seed": seed}), flush=True)
    return Dataset.from_dict(rows).shuffle(seed=seed), stats


# ---------------------------------------------------------------------------------------------------------- report
def build_table(runs, base_test, sweep_seed) -> dict:
    """Per method: the learning rate with the best validation accuracy on the sweep seed, and the held-out accuracy
    of that rate's runs, one per seed."""
    table = {"base": {"test_per_seed": [base_test], "lr": None}}
    for method in METHODS:
        sweep = [r for r in runs if r["method"] == method and r["seed"] == sweep_seed]
        if not sweep:
            continue
        best = max(sweep, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]
        chosen = sorted((r for r in runs if r["method"] == method and r["lr"] == best and "test_accuracy" in r),
                        key=lambda r: r["seed"])  # fmt: skip
        table[method] = dict(lr=best, seeds=[r["seed"] for r in chosen],
                             test_per_seed=[r["test_accuracy"] for r in chosen],
                             val_by_lr={f"{r['lr']:g}": r["val_accuracy"] for r in sorted(sweep, key=lambda r: r["lr"])},
                             seconds_mean=statistics.fmean(r["seconds"] for r in chosen))  # fmt: skip
    return table


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    names = ["base", *METHODS]
    for i, name in enumerate(names):
        values = summary["table"][name]["test_per_seed"]
        ax1.bar(i, statistics.fmean(values), color=f"C{i}", alpha=0.7)
        ax1.scatter([i] * len(values), values, color="k", s=12, zorder=3)
    ax1.set_xticks(range(len(names)), [LABELS[n] for n in names])
    ax1.set(ylabel=f"greedy accuracy, {summary['config']['test_size']} held-out prompts", ylim=(0, 1))
    ax1.set_title("Held-out accuracy (bars: mean; dots: seeds)")
    for i, method in enumerate(METHODS, start=1):
        best = summary["table"][method]["lr"]
        for r in (r for r in summary["runs"] if r["method"] == method and r["lr"] == best):
            if r["sample_accuracy_curve"]:
                steps, values = zip(*r["sample_accuracy_curve"])
                ax2.plot(steps, values, color=f"C{i}", alpha=0.8, label=LABELS[method] if r["seed"] == 0 else None)
    ax2.set(xlabel="optimizer step", ylabel="share of right sampled answers", ylim=(0, 1))
    ax2.set_title("Sampled answers during training (chosen rate, each seed)")
    for i, method in enumerate(METHODS, start=1):
        by_lr = summary["table"][method]["val_by_lr"]
        ax3.plot([float(lr) for lr in by_lr], list(by_lr.values()), "o-", color=f"C{i}", label=LABELS[method])
    ax3.axhline(summary["table"]["base"].get("val", float("nan")), color="C0", ls="--")
    ax3.set(xscale="log", xlabel="learning rate (LoRA)", ylabel="greedy accuracy, validation prompts", ylim=(0, 1))
    ax3.set_title(f"Learning-rate choice (seed {summary['sweep_seed']})")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    ax2.legend()
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_data(folder: Path, n_rows: int = 1024, seed: int = 0) -> None:
    """Files for the `trl-kto-ext` commands (configs/smollm2-*.yaml): prompts.jsonl (train prompts with `answer`),
    heldout.jsonl (the held-out prompts) and kto.jsonl: `n_rows` labelled answers to train prompts in the model's
    own answer style ("a + b = s"), half right, half with the mistakes it makes (a carry lost or added: s -/+ 10,
    s -/+ 1, the hundreds digit dropped)."""
    rng = random.Random(seed)
    pairs = splits()
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("prompts", "train"), ("heldout", "test")):
        prompt_dataset(pairs[split]).to_json(folder / f"{name}.jsonl")
    rows = {"prompt": [], "completion": [], "label": []}
    for i in range(n_rows):
        a, b = rng.choice(pairs["train"])
        right, total = i % 2 == 0, a + b
        wrong = rng.choice(
            [total - 10, total + 10, total - 1, total + 1, total % 100 if total >= 100 else total + 100]
        )
        rows["prompt"].append(question(a, b))
        rows["completion"].append([{"role": "assistant", "content": f"{a} + {b} = {total if right else wrong}"}])
        rows["label"].append(right)
    Dataset.from_dict(rows).shuffle(seed=seed).to_json(folder / "kto.jsonl")
    print(
        f"wrote {folder}/prompts.jsonl ({len(pairs['train'])}), heldout.jsonl ({len(pairs['test'])}), kto.jsonl ({n_rows})"
    )


def evaluate(model_dir: str, cfg) -> float:
    """Greedy held-out accuracy of a trained output folder (a full model or LoRA adapters on SmolLM2)."""
    smol = build_smollm2()
    tokenizer = smol.load_tokenizer()
    if (Path(model_dir) / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(load_base(smol, cfg), model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = accuracy(model.eval(), tokenizer, splits()["test"], cfg)
    print(f"held-out greedy accuracy of {model_dir}: {result:.3f} ({TEST_SIZE} prompts)")
    return result


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["data"]:
        return write_data(Path(argv[1] if len(argv) > 1 else "data/addition"))
    if argv[:1] == ["eval"]:
        return evaluate(argv[1] if len(argv) > 1 else build_smollm2().model_dir, FULL)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Also: `real_task.py data [FOLDER]` writes the files of configs/smollm2-*.yaml (default data/addition); "
        "`real_task.py eval [OUTPUT_DIR]` prints the held-out accuracy of a trained folder (default: the base model).",
    )
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (checks the script only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (the first picks the learning rates)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default="results", help="folder for real_task.json and real_task.png")
    parser.add_argument("--work", default=None, help="folder for the runs' LoRA adapters (default: a temporary one)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine a second thread made steps several times slower)",
    )
    for key in ("steps", "prompts_per_step", "generations"):
        parser.add_argument(f"--{key}", type=int, default=None, help=f"override the {key} of the setting")
    parser.add_argument("--lr_grid", type=float, nargs="+", default=None, help="override the learning-rate grid")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="override the weights' dtype")
    parser.add_argument(
        "--fixed_lrs",
        nargs="+",
        default=None,
        metavar="METHOD=LR",
        help="run these methods at this learning rate only (no sweep), e.g. online_kto=1e-4",
    )
    parser.add_argument(
        "--append",
        default=None,
        metavar="JSON",
        help="add this invocation's runs to an earlier real_task.json (same setting) and rebuild the table",
    )
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: getattr(args, k) for k in ("steps", "prompts_per_step", "generations", "lr_grid", "dtype")
                if getattr(args, k) is not None})  # fmt: skip
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="real-task-"))
    start = time.perf_counter()
    smol = build_smollm2()
    tokenizer = smol.load_tokenizer()
    pairs = splits()
    pairs["test"], pairs["val"] = pairs["test"][: cfg["test_size"]], pairs["val"][: cfg["val_size"]]
    base = load_base(smol, cfg).eval()
    base_test, base_val = accuracy(base, tokenizer, pairs["test"], cfg), accuracy(base, tokenizer, pairs["val"], cfg)
    print(json.dumps({"base_test_accuracy": base_test, "base_val_accuracy": base_val}), flush=True)
    del base
    online_pairs = pairs["train"][: len(pairs["train"]) // 2]  # online arms sample these; offline the other half
    offline_pool = {"train": pairs["train"][len(pairs["train"]) // 2 :]}
    data = {"prompts": prompt_dataset(online_pairs), "kto_rows": {}, "offline_stats": {}}
    fixed = dict(item.split("=") for item in args.fixed_lrs or [])
    results = []
    for method in args.methods:
        for seed in args.seeds if method == "offline_kto" else []:
            data["kto_rows"][seed], data["offline_stats"][seed] = offline_rows(
                smol, tokenizer, offline_pool, cfg, seed
            )
        grid = [float(fixed[method])] if method in fixed else cfg["lr_grid"]
        seed0 = args.seeds[0]
        sweep = [run(method, smol, tokenizer, data, cfg, lr, seed0, pairs, work / f"{method}-lr{lr:g}-seed{seed0}")
                 for lr in grid]  # fmt: skip
        best = max(sweep, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]
        runs = [r for r in sweep if r["lr"] == best]
        runs += [run(method, smol, tokenizer, data, cfg, best, s, pairs, work / f"{method}-lr{best:g}-seed{s}")
                 for s in args.seeds[1:]]  # fmt: skip
        for r in runs:  # the held-out prompts: only the chosen learning rate's runs, once each
            model = PeftModel.from_pretrained(load_base(smol, cfg), r["adapter"])
            r["test_accuracy"] = accuracy(model.eval(), tokenizer, pairs["test"], cfg)
            print(json.dumps({"method": method, "seed": r["seed"], "lr": r["lr"], "test": r["test_accuracy"]}),
                  flush=True)  # fmt: skip
        results += sweep + runs[1:]
    command = "python scripts/real_task.py " + " ".join(argv)
    summary = dict(config=cfg, sweep_seed=args.seeds[0], base_test_accuracy=base_test, runs=results,
                   offline_data={str(k): v for k, v in data["offline_stats"].items()}, commands=[command],
                   wall_seconds=[round(time.perf_counter() - start, 1)], torch_threads=torch.get_num_threads(),
                   cpu_count=os.cpu_count())  # fmt: skip
    if args.append:  # a later invocation's runs join an earlier one's (same task, split and setting)
        earlier = json.loads(Path(args.append).read_text())
        same = {k: v for k, v in earlier["config"].items() if k != "lr_grid"} == {
            k: v for k, v in cfg.items() if k != "lr_grid"
        }
        if not same or earlier["base_test_accuracy"] != base_test:
            raise SystemExit(f"{args.append} was run with another setting: {earlier['config']}")
        summary["runs"] = earlier["runs"] + results
        summary["offline_data"] = {**earlier["offline_data"], **summary["offline_data"]}
        summary["config"]["lr_grid"] = sorted({*earlier["config"]["lr_grid"], *cfg["lr_grid"]})
        summary["commands"] = earlier["commands"] + summary["commands"]
        summary["wall_seconds"] = earlier["wall_seconds"] + summary["wall_seconds"]
        summary["sweep_seed"] = earlier["sweep_seed"]
    table = summary["table"] = build_table(summary["runs"], base_test, summary["sweep_seed"])
    table["base"]["val"] = base_val
    (out / "real_task.json").write_text(json.dumps(summary, indent=1) + "\n")
    if set(table) == {"base", *METHODS}:
        plot(summary, out / "real_task.png")
    print("| method | lr | held-out accuracy, mean (per seed) | train seconds per run |")
    print("|---|---|---|---|")
    for name, row in table.items():
        per_seed = ", ".join(f"{x:.3f}" for x in row["test_per_seed"])
        lr = f"{row['lr']:g}" if row["lr"] else "-"
        seconds = f"{row['seconds_mean']:.0f}" if "seconds_mean" in row else "-"
        print(f"| {LABELS[name]} | {lr} | {statistics.fmean(row['test_per_seed']):.3f} ({per_seed}) | {seconds} |")
    print(f"wrote {out / 'real_task.json'} in {summary['wall_seconds'][-1]:.0f} s")


if __name__ == "__main__":
    main()
