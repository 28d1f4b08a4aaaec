"""The fast log-prob path (completion-only head, length buckets, sorted cached reference) keeps the estimator exactly."""

import copy
import itertools
import logging
import random

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from test_loss import reference_kto

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.logps import install_completion_head, length_buckets
from trl_kto_ext.tiny import ALPHABET


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


def padded_logps(model, ids, attention_mask, completion_mask):
    """Straightforward padded computation: full forward, log_softmax over the vocabulary in float64, summed."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits.double()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


CASES = [
    # (LoRA, kl_pairing, batch size, precompute)
    (False, "batch", 5, False),
    (False, "dataset", 1, True),
    (True, "batch", 3, False),
    (True, "dataset", 4, True),
]


@pytest.mark.parametrize("use_lora,kl_pairing,batch_size,precompute", CASES)
def test_loss_z0_rewards_equal_a_padded_computation(
    small_model, tiny_tokenizer, tmp_path, caplog, use_lora, kl_pairing, batch_size, precompute
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
    )
    with caplog.at_level(logging.WARNING):
        trainer = KTOExtTrainer(
            model=model, args=args, train_dataset=odd_length_dataset(23, seed=3), processing_class=tiny_tokenizer
        )
        if use_lora:
            perturb_lora_(trainer.model, seed=1)
        else:
            with torch.no_grad():
                g = torch.Generator().manual_seed(1)
                for p in trainer.model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
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
            metrics = trainer._metrics["train"]
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
    # the fast path ran (not TRL's fallback) on every model it met
    assert trainer._fast_path._verdict and all(trainer._fast_path._verdict.values())
    assert "path off" not in caplog.text


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
