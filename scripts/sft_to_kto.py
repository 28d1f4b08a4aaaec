"""KTO with `KTOExtTrainer`: scripts/sft_baseline.py with a new import, config class and dataset.

`--model tiny` (the default) runs offline: a tiny Llama pretrained on noisy addition, built once and cached.
"""

import argparse

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.models.tiny import build_tiny_default, make_kto_dataset


def load_train_dataset(n_rows: int, seed: int):
    """The training rows. Replace with your own, e.g. `datasets.load_dataset(...)`."""
    # KTO: `prompt` / `completion` / `label` rows. It also learns from wrong answers (label False).
    return make_kto_dataset(n_rows, seed=seed, desirable_ratio=0.5)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="Hub id, local folder, or 'tiny' (the embedded default)")
    parser.add_argument("--output-dir", default="runs/kto")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--beta", type=float, default=0.1, help="KTO: strength of the KL penalty")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--n-rows", type=int, default=512, help="training rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use-peft", action="store_true", help="train LoRA adapters instead of every weight")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.model == "tiny":
        args.model = str(build_tiny_default().model_dir)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataset = load_train_dataset(args.n_rows, args.seed)

    peft_config = None
    if args.use_peft:
        peft_config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )

    training_args = KTOExtConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        beta=args.beta,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        logging_steps=args.logging_steps,
        save_strategy="no",
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        report_to="none",
        seed=args.seed,
    )
    trainer = KTOExtTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json with the logged losses


if __name__ == "__main__":
    main()
