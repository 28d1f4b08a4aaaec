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
from trl_kto_ext.logps import install_completion_head, installed_head_settings
from trl_kto_ext.shared_prompt import shared_prompt_logps


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
    cached values are the unpadded float64 ones (tests/test_ref_cache.py checks them against the padded pass too)."""
    initial = copy.deepcopy(small_model).eval()
    calls = []
    small_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("past_key_values") is not None), with_kwargs=True
    )
    with caplog.at_level(logging.INFO, logger="trl_kto_ext.ref_cache"):
        trainer, _ = build(small_model, tiny_tokenizer, tmp_path, odd_length_dataset(21, seed=6))
    assert "run twice" not in caplog.text
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
    with caplog.at_level(logging.INFO, logger="trl_kto_ext.ref_cache"):
        trainer, _ = build(small_model, tiny_tokenizer, tmp_path, odd_length_dataset(21, seed=7))
    assert "Reference pass with each prompt run twice (target and KL rows): its log-probs differ" in caplog.text
    data = trainer.train_dataset
    for i in range(len(data)):
        row = data[i]
        kl = float64_logps(initial, row["prompt_ids"], row["KL_completion_ids"], trainer.args.max_length)
        assert row["ref_KL_logps"] == pytest.approx(kl, 1e-5)


def test_without_kl_rows_the_targets_are_a_single_pass(small_model, tiny_tokenizer, tmp_path):
    """apo_zero_unpaired has no KL rows: nothing to share, the targets' values are still exact."""
    initial = copy.deepcopy(small_model).eval()
    args = cpu_args(
        tmp_path / "out",
        per_device_train_batch_size=4,
        precompute_ref_log_probs=True,
        loss_type="apo_zero_unpaired",
        ref_cache_dir=str(tmp_path / "cache"),
    )
    data = odd_length_dataset(9, seed=8)
    trainer = KTOExtTrainer(model=small_model, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    for row in trainer.train_dataset:
        expected = float64_logps(initial, row["prompt_ids"], row["completion_ids"], trainer.args.max_length)
        assert row["ref_logps"] == pytest.approx(expected, 1e-5)
