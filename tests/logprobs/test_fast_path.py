"""The fast log-prob path (completion-only head, length buckets, sorted cached reference) keeps the estimator exactly."""

import copy
import itertools
import logging
import random

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from test_loss import reference_kto
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.logprobs.completion import (
    HeadSettings,
    completion_logps,
    head_log_probs,
    install_completion_head,
    length_buckets,
    pack_rows,
    packed_completion_logps,
)
from trl_kto_ext.logprobs.fast_path import fast_path
from trl_kto_ext.models.tiny import ALPHABET
from trl_kto_ext.report import step_metrics


def odd_length_dataset(n_rows, seed):
    """Prompts of 1-70 characters and completions of 1-45, long-tailed (most short, a few long)."""
    rng = random.Random(seed)

    def text(short, long):
        n = rng.randint(1, long) if rng.random() < 0.2 else rng.randint(1, short)
        return "".join(rng.choice(ALPHABET[:60]) for _ in range(n))

    return Dataset.from_dict(
        {
            "prompt": [text(12, 70) for _ in range(n_rows)],
            "completion": [text(8, 45) for _ in range(n_rows)],
            "label": [i % 3 != 0 for i in range(n_rows)],
        }
    )


def perturb_lora_(model, seed):
    """Non-zero LoRA weights, so that the policy differs from the reference (adapters off)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and ".default." in name:  # the policy adapter, not a "ref" copy
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def move_policy_(model, use_lora, seed):
    """Moves the policy away from the reference: random LoRA weights, or every weight plus noise of scale 0.1."""
    if use_lora:
        perturb_lora_(model, seed=seed)
        return
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def padded_logps(model, ids, attention_mask, completion_mask):
    """Straightforward padded computation: full forward, log_softmax over the vocabulary in float64, summed."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits.double()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


CASES = [
    # (LoRA, kl_pairing, batch size, precompute, padding-free no-grad passes)
    (False, "batch", 5, False, False),
    (False, "dataset", 1, True, False),
    (True, "batch", 3, False, False),
    (True, "dataset", 4, True, False),
    (False, "batch", 6, False, True),
    (True, "batch", 1, False, True),
    (True, "dataset", 4, True, True),
    # kl_pairing unset with precompute: resolves to "dataset" (every reference log-prob cached)
    (False, None, 3, True, False),
    (True, None, 4, True, False),
    # "batch" set with precompute: targets cached, the KL rows' reference runs per step
    (False, "batch", 4, True, False),
]


@pytest.mark.parametrize("use_lora,kl_pairing,batch_size,precompute,packed", CASES)
def test_loss_z0_rewards_equal_a_padded_computation(
    small_model, tiny_tokenizer, tmp_path, caplog, use_lora, kl_pairing, batch_size, precompute, packed
):
    beta = 0.3
    initial = copy.deepcopy(small_model)
    model = small_model
    if use_lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    args = cpu_args(
        tmp_path,
        per_device_train_batch_size=batch_size,
        kl_pairing=kl_pairing,
        precompute_ref_log_probs=precompute,
        ref_cache_dir=str(tmp_path / "cache"),
        beta=beta,
        pack_no_grad_passes=packed,
    )
    with caplog.at_level(logging.WARNING):
        trainer = KTOExtTrainer(
            model=model, args=args, train_dataset=odd_length_dataset(23, seed=3), processing_class=tiny_tokenizer
        )
        move_policy_(trainer.model, use_lora, seed=1)
        trainer.model.train()
        batches = itertools.islice(iter(trainer.get_train_dataloader()), 3)
        for batch in batches:
            loss = trainer.compute_loss(trainer.model, dict(batch)).item()
            target = [batch[k] for k in ("input_ids", "attention_mask", "completion_mask")]
            kl = [batch[f"KL_{k}"] for k in ("input_ids", "attention_mask", "completion_mask")]
            if use_lora:
                policy, kl_policy = padded_logps(trainer.model, *target), padded_logps(trainer.model, *kl)
                with trainer.model.disable_adapter():
                    reference, kl_reference = padded_logps(trainer.model, *target), padded_logps(trainer.model, *kl)
            else:
                policy, kl_policy = padded_logps(trainer.model, *target), padded_logps(trainer.model, *kl)
                reference, kl_reference = padded_logps(initial, *target), padded_logps(initial, *kl)
            labels = batch["label"].tolist()
            lam_d = trainer.loss_aversion.desirable_weight
            expected, z0, z0_raw = reference_kto(
                policy.tolist(),
                reference.tolist(),
                kl_policy.tolist(),
                kl_reference.tolist(),
                labels,
                beta,
                lam_d,
                1.0,
            )
            metrics = {k: [v] for k, v in step_metrics.summarize(trainer, "train").items()}  # this batch alone
            assert loss == pytest.approx(expected, rel=1e-5)
            # z0 and the rewards are differences of two summed log-probs: 1e-5 relative to those sums (fp32 rounds each
            # sum to ~1e-7 of its size, which can exceed 1e-5 of a small difference whatever the implementation).
            kl_scale = 1e-5 * (kl_policy.abs() + kl_reference.abs()).max().item()
            assert metrics["kl_raw"][-1] == pytest.approx(z0_raw, rel=1e-5, abs=kl_scale)
            assert metrics["kl"][-1] == pytest.approx(z0, rel=1e-5, abs=kl_scale)
            rewards = (beta * (policy - reference)).tolist()
            scale = (beta * (policy.abs() + reference.abs())).tolist()
            for name, wanted in (("chosen", True), ("rejected", False)):
                rows = [i for i, label in enumerate(labels) if label == wanted]
                if rows:
                    mean = sum(rewards[i] for i in rows) / len(rows)
                    tolerance = 1e-5 * max(scale[i] for i in rows)
                    assert metrics[f"rewards/{name}"][-1] == pytest.approx(mean, rel=1e-5, abs=tolerance)
    # the fast path ran (not TRL's fallback) on every model it met, packed where asked
    assert trainer._fast_path._verdict and all(trainer._fast_path._verdict.values())
    assert "path off" not in caplog.text and "packing" not in caplog.text
    assert bool(trainer._fast_path._packing_verdict) == packed
    # the policy's KL rows continued from the prompts of its gradient pass (prompt_reuse), checked exact on batch 1
    assert list(trainer._fast_path._reuse_verdict.values()) == [True]
    assert all(trainer._fast_path._packing_verdict.values())


def test_length_buckets_are_the_cheapest_partition():
    """Against brute force over every partition of the sorted rows into consecutive groups."""
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.choice([rng.randint(1, 20), rng.randint(100, 400)]) for _ in range(rng.randint(1, 7))]
        overhead = rng.choice([0, 16, 64, 500])
        groups = length_buckets(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        cost = sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)
        s = sorted(lengths)
        best = min(
            sum((b - a) * s[b - 1] + overhead for a, b in zip((0, *cuts), (*cuts, len(s))))
            for k in range(len(s))
            for cuts in itertools.combinations(range(1, len(s)), k)
        )
        assert cost == best
    assert length_buckets([5, 300, 7, 290], 64) == [[0, 2], [3, 1]]


def test_a_model_without_trl_fused_head_is_left_alone(small_model):
    forward = small_model.forward
    assert install_completion_head(small_model) is False
    assert small_model.forward == forward


# ------------------------------------------------------------------------------------------ padding-free packing

KEYS = ("input_ids", "attention_mask", "completion_mask")


def packing_trainer(model, tokenizer, tmp_path, batch_size=8, **overrides):
    args = cpu_args(tmp_path, per_device_train_batch_size=batch_size, pack_no_grad_passes=True, **overrides)
    return KTOExtTrainer(
        model=model, args=args, train_dataset=odd_length_dataset(24, seed=4), processing_class=tokenizer
    )


@pytest.mark.parametrize("capacity", [None, 10_000])
def test_packed_pass_equals_padded_float64(small_model, tiny_tokenizer, tmp_path, capacity):
    """Rows packed end to end (capacity None: packs no wider than the batch; 10000: the whole batch in one pack)
    give the padded float64 log-probs of every row, token by token and summed."""
    trainer = packing_trainer(small_model, tiny_tokenizer, tmp_path)
    model = trainer.model.eval()
    assert install_completion_head(model)  # on the TRL fused head the trainer patched on
    for batch in itertools.islice(iter(trainer.get_train_dataloader()), 2):
        for prefix in ("", "KL_"):
            ids, mask, completion = (batch[prefix + k] for k in KEYS)
            lengths = mask.sum(-1).tolist()
            packs = pack_rows(lengths, capacity or ids.size(1))
            assert len(packs) < len(lengths)  # some pack holds several sequences
            per_token = packed_completion_logps(model, ids, mask, completion, capacity=capacity)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.double()
            expected = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * completion[:, 1:]
            assert per_token.shape == expected.shape
            assert torch.allclose(per_token.double(), expected, rtol=1e-5, atol=1e-5)
            assert torch.allclose(per_token.double().sum(-1), expected.sum(-1), rtol=1e-5, atol=0)


def test_pack_rows_first_fit_decreasing():
    rng = random.Random(1)
    for _ in range(50):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 12))]
        width = rng.randint(max(lengths), 60)
        packs = pack_rows(lengths, width)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in p) <= width for p in packs)
        assert len(packs) <= len(lengths)
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]


def _causal_only_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention kernel that applies its own causal mask and ignores the one it is given (as a plain causal
    kernel would): exact for right-padded rows, wrong for packed ones."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


@pytest.fixture
def causal_only_attention():
    AttentionInterface.register("kto_test_causal_only", _causal_only_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("kto_test_causal_only", sdpa_mask)
    yield "kto_test_causal_only"
    AttentionInterface._global_mapping.pop("kto_test_causal_only", None)
    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop("kto_test_causal_only", None)


def test_attention_that_ignores_packing_falls_back_to_buckets(
    small_model, tiny_tokenizer, tmp_path, caplog, causal_only_attention
):
    """With a kernel that ignores the block-diagonal mask the packed check fails (said once), the no-grad passes use
    the length buckets, and their values are still the padded float64 ones."""
    small_model.set_attn_implementation(causal_only_attention)
    with caplog.at_level(logging.WARNING):
        trainer = packing_trainer(small_model, tiny_tokenizer, tmp_path)
        batches = list(itertools.islice(iter(trainer.get_train_dataloader()), 2))
        path = fast_path(trainer)
        for batch in batches:
            for prefix in ("", "KL_"):
                got = path.sequence_logps(trainer.model, batch, tuple(prefix + k for k in KEYS))
                expected = padded_logps(trainer.model, *(batch[prefix + k] for k in KEYS))
                assert torch.allclose(got.double(), expected, rtol=1e-5, atol=0)
    assert list(path._verdict.values()) == [True]  # the bucketed fast path itself is exact with this kernel
    assert list(path._packing_verdict.values()) == [False]
    assert caplog.text.count("Padding-free packing of the no-grad passes off for LlamaForCausalLM") == 1
    assert "packed log-probs differ from TRL's" in caplog.text
    # the same kernel really breaks packed rows: the check did not fail for another reason
    ids, mask, completion = (batches[0][k] for k in KEYS)
    packed = packed_completion_logps(trainer.model.eval(), ids, mask, completion, capacity=10_000).sum(-1).double()
    assert not torch.allclose(packed, padded_logps(trainer.model, ids, mask, completion), rtol=1e-3)


# ------------------------------------------------------------------------------------------ precisions and model sources


def trl_sequence_logps(model, ids, attention_mask, completion_mask):
    """Summed completion log-probs [B] through TRL's fused LM head (every position projected), as TRL's path runs."""
    labels = ids.masked_fill(completion_mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False)
    return out.log_probs[:, -(ids.size(1) - 1) :].sum(-1).double()


@pytest.mark.parametrize(
    "source,bf16,use_lora",
    [
        ("path", False, False),
        ("path", None, False),
        ("object", False, False),
        ("object", None, False),
        ("object", None, True),
    ],
)
def test_fast_path_is_used_for_policy_and_reference(small_model, tiny_tokenizer, tmp_path, source, bf16, use_lora):
    """The default user's set-ups: the model given by path or as an object, fp32 or bf16 left unset (on with
    `use_cpu`: bf16 autocast, which wraps the prepared models' forwards), optionally LoRA. After a training step (the
    policy prepared and updated), the fast path is on for the policy's and the reference's causal LM, and the loss
    equals the KTO formula on the log-probs of TRL's fused-head path through the same prepared models."""
    model = small_model
    if source == "path":
        model = str(tmp_path / "model")
        small_model.save_pretrained(model)
    elif use_lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    beta = 0.3
    args = cpu_args(tmp_path, bf16=bf16, max_steps=1, per_device_train_batch_size=6, beta=beta, learning_rate=1e-2)
    assert args.bf16 == (bf16 is None)  # unset: on, as for `use_cpu=True` by default
    trainer = KTOExtTrainer(
        model=model, args=args, train_dataset=odd_length_dataset(24, seed=5), processing_class=tiny_tokenizer
    )
    trainer.train()
    if use_lora:
        perturb_lora_(trainer.model, seed=2)
    path = fast_path(trainer)
    lms = {id(path.causal_lm(trainer.model))}
    if not use_lora:
        lms.add(id(path.causal_lm(trainer.ref_model)))
    if args.bf16:  # the configuration the fast path once missed: accelerate's autocast wrapper on the forward
        assert "_original_forward" in (trainer.model if use_lora else trainer.ref_model).__dict__
    assert set(path._verdict) == lms and all(path._verdict.values())

    trainer.model.train()  # the training-step metrics; this Llama has no dropout
    for batch in itertools.islice(iter(trainer.get_train_dataloader()), 2):
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        target = [batch[k] for k in KEYS]
        kl = [batch["KL_" + k] for k in KEYS]
        policy, kl_policy = (trl_sequence_logps(trainer.model, *rows) for rows in (target, kl))
        if use_lora:
            with trainer.model.disable_adapter():
                reference, kl_reference = (trl_sequence_logps(trainer.model, *rows) for rows in (target, kl))
        else:
            reference, kl_reference = (trl_sequence_logps(trainer.ref_model, *rows) for rows in (target, kl))
        expected, _, _ = reference_kto(
            policy.tolist(),
            reference.tolist(),
            kl_policy.tolist(),
            kl_reference.tolist(),
            batch["label"].tolist(),
            beta,
            trainer.loss_aversion.desirable_weight,
            1.0,
        )
        # the start-up check's tolerance: under bf16 the length buckets' shapes change the rounding a little
        assert loss == pytest.approx(expected, rel=2e-2 if args.bf16 else 1e-5)
        # in one call (the same shapes as TRL's), the completion-only head runs under the same autocast as TRL's
        # forward: equal log-probs (computed in fp32 instead, they differ by ~1e-4 relative)
        for model, wanted in ((trainer.model, policy), (trainer.ref_model, reference)):
            if model is not None:
                with torch.no_grad():
                    got = completion_logps(model, *target).log_probs.sum(-1).double()
                assert torch.allclose(got, wanted, rtol=1e-6, atol=0)
    assert set(path._verdict) == lms and all(path._verdict.values())
    assert list(path._reuse_verdict.values()) == [True]  # the policy's KL rows continued, also under bf16 autocast


def test_fallback_is_said_once_per_trainer(small_model, tiny_tokenizer, tmp_path, caplog):
    """Prompt tuning adds virtual tokens, so the fast path cannot apply: the trainer runs TRL's path (verdict off) and
    says so once, at info level, whatever the number of passes."""
    model = get_peft_model(small_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    args = cpu_args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    with caplog.at_level(logging.INFO, logger="trl_kto_ext.logprobs.fast_path"):
        trainer = KTOExtTrainer(
            model=model, args=args, train_dataset=odd_length_dataset(12, seed=6), processing_class=tiny_tokenizer
        )
        trainer.train()
    assert list(fast_path(trainer)._verdict.values()) == [False]
    message = (
        "Using TRL's standard log-prob computation for the model (LlamaForCausalLM): prompt-learning PEFT adds virtual "
        "tokens; results are the same, only slower."
    )
    assert [r.getMessage() for r in caplog.records if r.name == "trl_kto_ext.logprobs.fast_path"] == [message]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "trl_kto_ext.logprobs.fast_path")


@pytest.mark.parametrize(
    "temperature,softcap,logit_scale,with_bias,max_elements",
    [(1.0, None, 1.0, False, 1 << 25), (0.7, 30.0, 0.5, True, 50), (1.3, None, 2.0, True, 7)],
)
def test_head_log_probs_equal_float64_log_softmax(temperature, softcap, logit_scale, with_bias, max_elements):
    """The no-grad CPU head: TRL's logit transform (scale, soft-cap, temperature), token chunks down to one row."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(13, 8, generator=g), torch.randn(11, 8, generator=g)
    bias = torch.randn(11, generator=g) if with_bias else None
    targets = torch.randint(0, 11, (13,), generator=g)
    settings = HeadSettings(temperature, softcap, logit_scale, False, "model")
    got = head_log_probs(hidden, weight, bias, targets, settings, max_elements=max_elements)
    z = hidden.double() @ weight.double().T + (bias.double() if with_bias else 0)
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    expected = (z / temperature).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
