"""Embedded tiny default: an offline char-level tokenizer, a tiny Llama pretrained on noisy addition, and KTO data."""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# The task lives in its own module; its public names are part of this namespace (configs name `trl_kto_ext.models.tiny.*`).
from trl_kto_ext.models.addition import (  # noqa: F401
    HELDOUT_SIZE,
    MAX_A,
    MAX_B,
    P_CORRECT_CARRY,
    P_CORRECT_NO_CARRY,
    WRONG_MINUS_ONE_SHARE,
    WRONG_PLUS_ONE_SHARE,
    _message,
    exact_answer_reward,
    format_prompt,
    heldout_prompts,
    is_correct,
    make_kto_dataset,
    make_paired_dataset,
    make_prompt_dataset,
    pretraining_corpus,
)

# Bump whenever the tokenizer, task, model or pretraining recipe changes: it names the cache directory, so newer code
# never loads a stale cached model.
VERSION = "v2"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Every character is its own token, so digits never merge and a tokenized prompt is always a prefix of the tokenized
# prompt+completion (TRL's KTO/DPO preprocessing relies on that).
ALPHABET = string.digits + "+-=*/ .,:;?!'\"()\n" + string.ascii_lowercase + string.ascii_uppercase
# Role tags are single tokens, so chat rows are only two tokens longer than plain ones. The assistant turn ends with
# EOS, and the prompt rendered with `add_generation_prompt=True` is a prefix of prompt+completion.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
MAX_LENGTH = 64

# KTO settings that lift held-out greedy accuracy from 0.59 to ~0.9 in ~10 s on one CPU core (trl.KTOTrainer, 50%
# desirable rows). Higher learning rates over-optimise this tiny model: 2e-4 gives ~0.85, 5e-4 ~0.3, 1e-3 ~0.05.
RECOMMENDED_KTO_ARGS = dict(learning_rate=1e-4, max_steps=200, per_device_train_batch_size=8, beta=0.1, max_length=32)

PRETRAIN_STEPS = 400
PRETRAIN_BATCH_SIZE = 128
PRETRAIN_LR = 3e-3
PRETRAIN_CHAT_SHARE = 0.5  # part of the corpus is in chat form, so conversational datasets work out of the box
# One thread makes the cached model bitwise reproducible on any machine, and for matrices this small a second thread
# gains little when the cores are free and costs several-fold when they are shared.
PRETRAIN_THREADS = 1


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Char-level WordLevel tokenizer over the task alphabet, with BOS added on encode and a chat template."""
    tokens = [PAD, BOS, EOS, UNK, *ROLE_TOKENS, *ALPHABET]
    backend = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(tokens)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # glue characters back without spaces
    # BOS only: TRL appends EOS to plain completions itself, and a post-processed EOS would end every prompt too.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokens.index(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,  # distinct from EOS, so masking padding never masks the end of a completion
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],  # Llama takes no token_type_ids
        model_max_length=MAX_LENGTH,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = MAX_LENGTH,
) -> LlamaForCausalLM:
    """Randomly initialised small Llama (~0.5M parameters by default) whose vocabulary and special ids match."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    generation = model.generation_config
    generation.pad_token_id, generation.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    generation.eos_token_id, generation.do_sample = tokenizer.eos_token_id, False
    return model


def _prompt_ids(tokenizer: PreTrainedTokenizerFast, prompt: str | list[dict[str, str]]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    chat = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return chat["input_ids"]


@torch.no_grad()
def greedy_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str | list[dict[str, str]]],
    answers: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 5,
) -> float:
    """Exact-match accuracy of greedy completions; a prompt is a string or a list of chat messages."""
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(x) for x in ids)
            # Left padding, so that generation continues from the last real token of every row.
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
            attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            completions = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            correct += sum(c.strip() == a.strip() for c, a in zip(completions, answers[start : start + batch_size]))
    finally:
        model.train(was_training)
    return correct / max(len(prompts), 1)


def _encode_corpus(tokenizer: PreTrainedTokenizerFast, seed: int, n_rows: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, completion ids) per corpus row; a share of the rows is in chat form."""
    rng = random.Random(seed + 1)  # own stream, so the chat share does not change which rows are drawn
    rows = pretraining_corpus(n_rows, seed)
    # Rendering the Jinja template per row would cost more than the training itself, so chat rows are built by string
    # formatting, checked once against the real template.
    prompt, completion = rows[0]
    rendered = tokenizer.apply_chat_template(
        _message("user", prompt) + _message("assistant", completion), tokenize=False
    )
    if rendered != f"{BOS}<|user|>{prompt}<|assistant|>{completion}{EOS}":
        raise RuntimeError("the chat template and the pretraining chat format disagree")
    chat = [rng.random() < PRETRAIN_CHAT_SHARE for _ in rows]
    contexts = [f"{BOS}<|user|>{p}<|assistant|>" if c else f"{BOS}{p}" for (p, _), c in zip(rows, chat)]
    # Char-level tokens: encoding context and completion apart gives the same ids as encoding them together.
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer([y + EOS for _, y in rows], add_special_tokens=False)["input_ids"]
    return list(zip(context_ids, completion_ids))


def pretrain_base_model(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    steps: int = PRETRAIN_STEPS,
    batch_size: int = PRETRAIN_BATCH_SIZE,
    lr: float = PRETRAIN_LR,
    progress: bool = True,
) -> list[float]:
    """Causal-LM training on the noisy corpus with a plain loop (deterministic, quick); returns the loss per step.

    `progress` shows a tqdm bar (on stderr) with the running loss.
    """
    from tqdm.auto import tqdm

    rows = _encode_corpus(tokenizer, seed, steps * batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(steps // 20, 1)
    # Linear warmup, then linear decay to 0: a high peak LR lets a model this small learn in a few hundred steps, and
    # the decay lets it settle on the corpus' answer frequencies.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / (steps - warmup)))
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="Pretraining the tiny model", unit="step", disable=not progress, file=sys.stderr)
    for step in bar:
        batch = rows[step * batch_size : (step + 1) * batch_size]
        width = max(len(c) + len(y) for c, y in batch)
        pads = [width - len(c) - len(y) for c, y in batch]
        input_ids = torch.tensor([c + y + [tokenizer.pad_token_id] * p for (c, y), p in zip(batch, pads)])
        attention_mask = torch.tensor([[1] * (width - p) + [0] * p for p in pads])
        # Loss on the completion only: the operands are uniformly random, so their loss is irreducible noise, and
        # with it in the objective the model learned the sums markedly slower.
        labels = torch.tensor([[-100] * len(c) + y + [-100] * p for (c, y), p in zip(batch, pads)])
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


@dataclass(frozen=True)
class TinyDefault:
    """A pretrained tiny base model on disk (model + tokenizer in `save_pretrained` format) and how it was built."""

    model_dir: str
    seed: int
    version: str
    base_accuracy: float  # greedy exact match on all held-out prompts
    pretrain_seconds: float

    def load_model(self) -> LlamaForCausalLM:
        return AutoModelForCausalLM.from_pretrained(self.model_dir)

    def load_tokenizer(self) -> PreTrainedTokenizerFast:
        return AutoTokenizer.from_pretrained(self.model_dir)


_METADATA_FILE = "tiny_default.json"


def load_tiny(n_rows: int = 256, seed: int = 0) -> tuple[str, PreTrainedTokenizerFast, Dataset]:
    """(model_dir, tokenizer, train_dataset) of the embedded tiny default, for examples and quick tries.

    `model_dir` is a local folder to pass as `model=` (built and cached on first use, see `build_tiny_default`);
    the dataset has `n_rows` unpaired `prompt` / `completion` / `label` rows over the training prompts, half desirable.
    """
    tiny = build_tiny_default()
    return tiny.model_dir, tiny.load_tokenizer(), make_kto_dataset(n_rows, seed=seed)


def default_cache_dir() -> Path:
    """Root of the on-disk cache: $TRL_KTO_EXT_CACHE, else ~/.cache/trl_kto_ext."""
    return Path(os.environ.get("TRL_KTO_EXT_CACHE", "~/.cache/trl_kto_ext")).expanduser()


def _read_cached(model_dir: Path) -> TinyDefault:
    # The path is not stored in the metadata, so a cache directory can be moved or mounted elsewhere.
    return TinyDefault(model_dir=str(model_dir), **json.loads((model_dir / _METADATA_FILE).read_text()))


def build_tiny_default(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, verbose: bool = True
) -> TinyDefault:
    """Pretrain the tiny base model once and cache it under `cache_dir`; later calls only read the cache.

    With `verbose` it says on stderr what it builds and where (with a progress bar; about 40 s of CPU time),
    or, on later calls, the one line "Using the cached tiny model at ...".
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / (f"tiny-{VERSION}" if seed == 0 else f"tiny-{VERSION}-seed{seed}")
    if (final / _METADATA_FILE).is_file():
        if verbose:
            print(f"Using the cached tiny model at {final}", file=sys.stderr, flush=True)
        return _read_cached(final)
    if verbose:
        print(
            f"Building the tiny default model once (a 0.5M-parameter Llama and a character tokenizer, pretrained for "
            f"{PRETRAIN_STEPS} steps on noisy addition, about 40 s of CPU time); it is cached at {final}",
            file=sys.stderr,
            flush=True,
        )

    root.mkdir(parents=True, exist_ok=True)
    # Build in a private directory next to the final one and rename it into place: a rename within one file system is
    # atomic, so readers never see a half-written model and concurrent builders never mix their files.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    threads = torch.get_num_threads()
    try:
        start = time.perf_counter()
        torch.set_num_threads(PRETRAIN_THREADS)
        with torch.random.fork_rng(devices=[]):
            tokenizer = build_tokenizer()
            model = build_model(tokenizer, seed=seed)
            pretrain_base_model(model, tokenizer, seed=seed, **({} if verbose else {"progress": False}))
            accuracy = greedy_accuracy(model, tokenizer, *heldout_prompts())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        metadata = {"seed": seed, "version": VERSION, "base_accuracy": accuracy}
        metadata["pretrain_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / _METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")  # written last: marks completion
        tmp.chmod(0o755)  # mkdtemp creates it private; the cache may be shared through TRL_KTO_EXT_CACHE
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _METADATA_FILE).is_file():  # a real failure, not a concurrent builder that finished first
                raise
        if verbose:
            print(f"Tiny model ready at {final} (held-out greedy accuracy {accuracy:.2f})", file=sys.stderr)
        return _read_cached(final)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
