"""Each prompt run once for its target and KL completions (KV cache) gives the padded pass's log-probs, and the
reference precompute uses it where a first-batch check shows it exact, else falls back and says so."""

import copy
import logging
import random

import pytest
import torch
from conftest import cpu_args
from peft import LoraConfig, get_peft_model
from test_fast_path import causal_only_attention, odd_length_dataset, perturb_lora_  # noqa: F401  (fixture)
from test_ref_cache import build
from trl.trainer.utils import add_fused_lm_head

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.logprobs.completion import install_completion_head, installed_head_settings
from trl_kto_ext.logprobs.shared_prompt import rows_from_batch, shared_prompt_logps


def float64_logps(model, prompt, completion, max_length=None):
    """log p(completion | prompt) from one unpadded forward of prompt + completion (cut at `max_length` tokens, as
    TRL's collator cuts), log-softmax in float64."""
    ids = (prompt + completion)[:max_length]
    if len(ids) <= len(prompt):
        return 0.0
    ids = torch.tensor([ids])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits.double().log_softmax(-1)[0]
    return sum(log_probs[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.size(1)))


def random_rows(rng, vocab, n_rows, k, longest_prompt=12, longest_completion=9):
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, longest_prompt))] for _ in range(n_rows)]
    completions = [
        [[rng.randrange(3, vocab) for _ in range(rng.randint(0, longest_completion))] for _ in range(k)]
        for _ in range(n_rows)
    ]
    return prompts, completions


def with_head(model):
    add_fused_lm_head(model)
    assert install_completion_head(model)
    return installed_head_settings(model)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("n_rows,k", [(1, 1), (1, 2), (5, 2), (7, 3)])
def test_equals_unpadded_float64(small_model, attention, n_rows, k):
    """Odd prompt lengths (1-12 tokens), empty and 1-token completions, batch 1, K = 1-3."""
    small_model.set_attn_implementation(attention)
    model = small_model.eval()
    settings = with_head(model)
    rng = random.Random(n_rows * 10 + k)
    prompts, completions = random_rows(rng, model.config.vocab_size, n_rows, k)
    completions[0][0] = []  # an empty completion
    completions[-1][-1] = completions[-1][-1][:1]  # a one-token completion: scored from the prompt alone
    got = shared_prompt_logps(model, settings, prompts, completions, pad_id=0)
    assert got.shape == (n_rows, k)
    expected = torch.tensor([[float64_logps(model, p, c) for c in cs] for p, cs in zip(prompts, completions)])
    assert torch.allclose(got.double(), expected.double(), rtol=1e-5, atol=1e-5)
    assert got[0, 0] == 0


def test_lora_with_adapters_off_is_the_base_model(small_model):
    base = copy.deepcopy(small_model).eval()
    peft_model = get_peft_model(small_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb_lora_(peft_model, seed=3)
    peft_model.eval()
    lm = peft_model.get_base_model()
    settings = with_head(lm)
    prompts, completions = random_rows(random.Random(2), base.config.vocab_size, 4, 2)
    with peft_model.disable_adapter():
        off = shared_prompt_logps(lm, settings, prompts, completions, pad_id=0)
    on = shared_prompt_logps(lm, settings, prompts, completions, pad_id=0)
    expected = torch.tensor([[float64_logps(base, p, c) for c in cs] for p, cs in zip(prompts, completions)])
    assert torch.allclose(off.double(), expected.double(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(on.double(), expected.double(), rtol=1e-3)  # the adapters really change the values


def test_an_empty_prompt_is_refused(small_model):
    settings = with_head(small_model)
    with pytest.raises(ValueError, match="at least one token"):
        shared_prompt_logps(small_model, settings, [[]], [[[5, 6]]], pad_id=0)


def test_precompute_runs_each_prompt_once(small_model, tiny_tokenizer, tmp_path, caplog):
    """The precompute's backbone calls continue from a cache (the prompts ran once), no fallback is logged, and the
    cached values are the unpadded float64 ones (tests/logprobs/test_ref_cache.py checks them against the padded pass too)."""
    initial = copy.deepcopy(small_model).eval()
    calls = []
    small_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("cache") is not None), with_kwargs=True
    )
    with caplog.at_level(logging.INFO, logger="trl_kto_ext"):
        trainer, _ = build(small_model, tiny_tokenizer, tmp_path, odd_length_dataset(21, seed=6))
    assert "once per completion" not in caplog.text and "standard log-prob" not in caplog.text
    assert any(calls)  # continuations from the cached prompts
    data = trainer.train_dataset
    for i in range(len(data)):
        row = data[i]
        assert row["ref_logps"] == pytest.approx(
            float64_logps(initial, row["prompt_ids"], row["completion_ids"], trainer.args.max_length), 1e-5
        )
        kl = float64_logps(initial, row["prompt_ids"], row["KL_completion_ids"], trainer.args.max_length)
        assert row["ref_KL_logps"] == pytest.approx(kl, 1e-5)


def test_precompute_falls_back_where_the_cached_prompt_gives_other_values(
    small_model,
    tiny_tokenizer,
    tmp_path,
    caplog,
    causal_only_attention,  # noqa: F811
):
    """An attention kernel that applies its own causal mask and ignores the padding mask is exact on right-padded rows
    but not when continuing from right-padded prompts: the first batch's check fails, the reason is logged, and the
    values come from the padded pass."""
    small_model.set_attn_implementation(causal_only_attention)
    initial = copy.deepcopy(small_model).eval()
    with caplog.at_level(logging.INFO, logger="trl_kto_ext"):
        trainer, _ = build(small_model, tiny_tokenizer, tmp_path, odd_length_dataset(21, seed=7))
    expected = (
        "Running each prompt once per completion (target and KL rows) for the model (LlamaForCausalLM): its log-probs "
        "differ from the padded pass by"
    )
    assert caplog.text.count(expected) == 1
    data = trainer.train_dataset
    for i in range(len(data)):
        row = data[i]
        kl = float64_logps(initial, row["prompt_ids"], row["KL_completion_ids"], trainer.args.max_length)
        assert row["ref_KL_logps"] == pytest.approx(kl, 1e-5)


def test_without_kl_rows_the_targets_are_a_single_pass(small_model, tiny_tokenizer, tmp_path):
    """apo_zero_unpaired has no KL rows: nothing to share, the targets' values are still exact."""
    initial = copy.deepcopy(small_model).eval()
    trainer, _ = build(
        small_model, tiny_tokenizer, tmp_path, odd_length_dataset(9, seed=8), loss_type="apo_zero_unpaired"
    )
    for row in trainer.train_dataset:
        expected = float64_logps(initial, row["prompt_ids"], row["completion_ids"], trainer.args.max_length)
        assert row["ref_logps"] == pytest.approx(expected, 1e-5)


@pytest.mark.parametrize("use_lora,kl_subset_size", [(False, None), (True, None), (False, 2)])
def test_live_reference_of_a_step(small_model, tiny_tokenizer, tmp_path, caplog, use_lora, kl_subset_size):
    """Per step (no cache, pairing in the batch): the reference's target and KL log-probs are the unpadded float64
    ones; with all KL rows the prompts run once (cache continuations seen), with a KL subset the padded passes run."""
    model = small_model
    if use_lora:  # a PeftModel given with non-zero adapters: the reference is that initial model (TRL's `ref` adapter)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        perturb_lora_(model, seed=1)
    initial = copy.deepcopy(model).eval()
    calls = []
    small_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("cache") is not None), with_kwargs=True
    )
    args = cpu_args(tmp_path, per_device_train_batch_size=6, kl_subset_size=kl_subset_size)
    data = odd_length_dataset(18, seed=9)
    trainer = KTOExtTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    if kl_subset_size is not None:
        from trl_kto_ext.collator import keep_kl_rows

        batch = keep_kl_rows(batch, kl_subset_size)
    with caplog.at_level(logging.INFO, logger="trl_kto_ext"):
        reference, kl_reference = trainer._reference_logps(batch)
    assert "once per completion" not in caplog.text
    assert any(calls) == (kl_subset_size is None)

    def rows(prefix):
        ids, mask, completion = (
            batch[prefix + k].tolist() for k in ("input_ids", "attention_mask", "completion_mask")
        )
        for i, m, c in zip(ids, mask, completion):
            start = c.index(1)
            yield i[:start], i[start : sum(m)]

    expected = [float64_logps(initial, p, c) for p, c in rows("")]
    expected_kl = [float64_logps(initial, p, c) for p, c in rows("KL_")]
    assert torch.allclose(reference.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert torch.allclose(kl_reference.double(), torch.tensor(expected_kl, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_rows_from_batch_refuses_what_it_cannot_split():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    completion = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    kl_ids = torch.tensor([[5, 9, 0], [8, 7, 6]])
    kl_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kl_completion = torch.tensor([[0, 1, 0], [0, 1, 1]])
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": completion,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_mask,
        "KL_completion_mask": kl_completion,
    }
    assert rows_from_batch(batch) == ([[5], [8]], [[[6, 7], [9]], [[9], [7, 6]]])
    assert rows_from_batch({**batch, "KL_input_ids": kl_ids.flip(0)}) is None  # another row's prompt
    left = {**batch, "attention_mask": mask.flip(1), "input_ids": ids.flip(1), "completion_mask": completion.flip(1)}
    assert rows_from_batch(left) is None  # left padding
    no_prompt = {**batch, "completion_mask": torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]])}
    assert rows_from_batch(no_prompt) is None
    subset = {k: (v[:1] if k.startswith("KL_") else v) for k, v in batch.items()}
    assert rows_from_batch(subset) is None
