"""Arms, settings and the synthetic model/data of scripts/benchmark.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from benchmark_real import REAL_MODEL, REAL_MODEL_LABEL

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
    # KTOExtTrainer's padding-free no-grad passes (`pack_no_grad_passes=True`).
    packed: bool = False


EXPERIMENTAL_BASES = ("sft", "trl_default", "ext_default", "ext_cached", "ext_fastest")


def experimental_arms(arms: list[Arm]) -> list[Arm]:
    """`<arm>_compact` copies of some arms, with the fused LM head scoring only completion positions (evidence for a
    suggested trainer change; not part of the six-arm comparison)."""
    return [
        replace(arm, name=f"{arm.name}_compact", label=f"{arm.label} + compact LM head", compact_head=True)
        for arm in arms
        if arm.name in EXPERIMENTAL_BASES
    ]


PACKED_BASES = ("ext_default", "ext_cached")


def packed_arms(arms: list[Arm]) -> list[Arm]:
    """`<arm>_packed` copies of the ext arms with padding-free no-grad passes (`pack_no_grad_passes=True`)."""
    return [
        replace(arm, name=f"{arm.name}_packed", label=f"{arm.label} + packed no-grad passes", packed=True)
        for arm in arms
        if arm.name in PACKED_BASES
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
            passes="1 fwd+bwd + 3 fwd (policy KL: completions only; ref target + KL: each prompt once)",
            no_grad_forwards=3,
        ),
        Arm(
            "ext_precompute",
            "KTOExtTrainer precompute_ref_log_probs (rest default)",
            "ext",
            precompute=True,
            passes="1 fwd+bwd + 1 fwd (policy KL: completions only)",
            no_grad_forwards=1,
        ),
        Arm(
            "ext_cached",
            "KTOExtTrainer cached ref, dataset pairing (shuffled)",
            "ext",
            precompute=True,
            kl_pairing="dataset",
            passes="1 fwd+bwd + 1 fwd (policy KL: completions only)",
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


# Long-tailed, chat-like lengths: log-normal around the median, clipped to the range; one whole epoch, every step
# measured and averaged (a batch costs what its longest row costs, so medians of a few steps swing both ways).
CHAT_SHAPES = {
    "full": dict(prompt_len=(8, 400), prompt_median=80, completion_len=(5, 200), completion_median=50, max_length=640),
    "quick": dict(prompt_len=(4, 60), prompt_median=12, completion_len=(2, 30), completion_median=8, max_length=96),
}
CHAT_SIGMA = 0.8


# Qwen2-0.5B's shape with random weights (for scripts/gpu_check.sh): 494M parameters, tied embeddings.
QWEN2_05B = dict(
    arch="qwen2",
    vocab_size=151936,
    hidden_size=896,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    intermediate_size=4864,
)


# SmolLM2-135M's shape with random weights (the real-shape preset): 134.5M parameters, 30 layers, tied embeddings,
# vocabulary 49152 like the real model's; short rows of 5-40 tokens like a real feedback log's turns.
SMOLLM2_135M = dict(
    arch="llama",
    vocab_size=49152,
    hidden_size=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    intermediate_size=1536,
    tie_word_embeddings=True,
    prompt_len=(5, 40),
    completion_len=(5, 40),
    max_length=96,
    warmup_steps=1,
    steps=6,
)


# What the table's header says of each model besides its architecture, size and vocabulary.
MODEL_LABELS = {
    "smollm2-135m": "SmolLM2-135M shape, random weights",
    REAL_MODEL: REAL_MODEL_LABEL,
    "qwen2-0.5b": "Qwen2-0.5B shape, random weights",
}


def settings_from_args(args) -> dict:
    preset = dict(PRESETS["quick" if args.quick else "full"])
    model = getattr(args, "model", "llama")
    if model == "qwen2-0.5b":
        preset.update(QWEN2_05B)
    if model in ("smollm2-135m", REAL_MODEL) and not args.quick:
        preset.update(SMOLLM2_135M)
    if model == REAL_MODEL:
        # The real model, tokenizer and vocabulary in every mode (`--quick` keeps its rows and steps: a smoke run).
        preset.update(real_model=True, arch="llama", vocab_size=SMOLLM2_135M["vocab_size"])
    if model in MODEL_LABELS:
        preset["model_label"] = MODEL_LABELS[model]
    if getattr(args, "shape", "short") == "chat":
        preset.update(CHAT_SHAPES["quick" if args.quick else "full"], length_dist="lognormal", aggregate="mean")
        preset["warmup_steps"] = 0
        preset["steps"] = 3 if args.quick else 12
    if args.steps is not None:
        preset["steps"] = args.steps
    if args.warmup_steps is not None:
        preset["warmup_steps"] = args.warmup_steps
    total_steps = preset["warmup_steps"] + preset["steps"]
    return dict(
        preset,
        model=model,
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


def build_data(settings: dict):
    """(tokenizer, rows): the synthetic WordLevel tokenizer and words "w<i>", or, for the real model, its own tokenizer
    and rows of real vocabulary words that are one token each after a space (so a row's drawn length is its length)."""
    if settings.get("real_model"):
        from benchmark_real import real_tokenizer, single_token_words

        tokenizer = real_tokenizer()
        return tokenizer, build_rows(settings, single_token_words(tokenizer))
    return build_tokenizer(settings["vocab_size"]), build_rows(settings)


def build_rows(settings: dict, vocab: list[str] | None = None) -> dict[str, list]:
    """Prompt/completion/label columns of random words, exactly half desirable. `vocab`: the words to draw from (each
    written after a space, prompts included), default the synthetic "w0", "w1", ... joined by spaces.

    Lengths are drawn uniformly in the preset's ranges once per pair of rows, and each pair gives one desirable and one
    undesirable row: the desirable rows alone (the SFT arm's data, two epochs of it) hold the same tokens as the whole
    KTO set, so every arm trains on the same number of tokens."""
    import random

    rng = random.Random(settings["seed"])
    n_words = settings["vocab_size"] - 4
    n = settings["n_rows"]

    def words(length):
        # the same random draws either way, so the real rows have the synthetic ones' lengths for the same vocab_size
        if vocab is not None:
            return "".join(" " + vocab[rng.randrange(n_words) % len(vocab)] for _ in range(length))
        return " ".join(f"w{rng.randrange(n_words)}" for _ in range(length))

    space = "" if vocab is not None else " "  # the completion's leading space (real words carry their own)

    examples = []
    for _ in range(n // 2):
        if settings.get("length_dist") == "lognormal":
            prompt_len = _lognormal(rng, settings["prompt_median"], settings["prompt_len"])
            completion_len = _lognormal(rng, settings["completion_median"], settings["completion_len"])
        else:
            prompt_len, completion_len = rng.randint(*settings["prompt_len"]), rng.randint(*settings["completion_len"])
        for label in (True, False):
            examples.append((words(prompt_len), space + words(completion_len), label))
    rng.shuffle(examples)
    return {
        "prompt": [e[0] for e in examples],
        "completion": [e[1] for e in examples],
        "label": [e[2] for e in examples],
    }


def _lognormal(rng, median: int, bounds: tuple[int, int]) -> int:
    return int(min(bounds[1], max(bounds[0], round(rng.lognormvariate(math.log(median), CHAT_SIGMA)))))


def build_model(settings: dict, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if settings.get("real_model"):
        from benchmark_real import real_model

        return real_model()
    if settings.get("arch") == "qwen2":
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=settings["hidden_size"],
            num_hidden_layers=settings["num_layers"],
            num_attention_heads=settings["num_heads"],
            num_key_value_heads=settings["num_kv_heads"],
            intermediate_size=settings["intermediate_size"],
            max_position_embeddings=max(2048, settings["max_length"]),
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(settings["seed"])
        return Qwen2ForCausalLM(config)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings["hidden_size"],
        num_hidden_layers=settings["num_layers"],
        num_attention_heads=settings["num_heads"],
        num_key_value_heads=settings.get("num_kv_heads", settings["num_heads"]),
        intermediate_size=settings["intermediate_size"],
        max_position_embeddings=max(512, settings["max_length"]),
        tie_word_embeddings=settings.get("tie_word_embeddings", False),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(settings["seed"])
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
