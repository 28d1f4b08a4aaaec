"""Start-up checks never stop a run: the fast path's check, the cached-prompt check and the reference cache fall back
to TRL's path (said once) where they cannot run, and a 4-bit model keeps its gradient through every check and pass."""

import copy
import logging
import math

import pytest
import torch
from conftest import collated_batch, cpu_args, logged_losses
from peft import LoraConfig
from test_fast_path import odd_length_dataset, padded_logps
from test_loss import reference_kto
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.logprobs import completion as completion_module
from trl_kto_ext.logprobs.fast_path import fast_path
from trl_kto_ext.models.tiny import build_tokenizer, make_kto_dataset

bnb = pytest.importorskip("bitsandbytes")

KEYS = ("input_ids", "attention_mask", "completion_mask")


def tiny_qwen2_dir(path, tokenizer):
    """A random Qwen2 shaped like TRL's `tiny-Qwen2ForCausalLM-2.5` test model (hidden size 8, 4 heads, 2 KV heads):
    its projections have 8 or 4 output features, which bitsandbytes' CPU inference layout refuses (multiples of 32)."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def four_bit():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def repacked_layers(model) -> int:
    return sum(
        bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


def test_qlora_on_a_qwen2_whose_shapes_the_cpu_4bit_kernel_refuses(tmp_path, caplog):
    """TRL's `test_peft_with_quantization` on CPU: the fast path's check used to put the 4-bit model in eval mode,
    where bitsandbytes repacks weights for inference and refuses these shapes (`N must be divisible by block_n`). The
    check runs the 4-bit layers as training does: it passes, the fast path is used, and no layer is repacked."""
    tokenizer = build_tokenizer()
    model_dir = tiny_qwen2_dir(tmp_path / "qwen2", tokenizer)
    args = cpu_args(
        tmp_path / "out", max_steps=2, per_device_train_batch_size=2, model_init_kwargs={"dtype": "float32"}
    )
    with caplog.at_level(logging.INFO, logger="trl_kto_ext.logprobs.fast_path"):
        trainer = KTOExtTrainer(
            model_dir, args=args, train_dataset=make_kto_dataset(8, seed=1), processing_class=tokenizer,
            quantization_config=four_bit(), peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"),
        )  # fmt: skip
        trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert trainer.model.get_base_model().is_loaded_in_4bit
    assert list(fast_path(trainer)._verdict.values()) == [True]
    assert "fast_path" not in caplog.text and repacked_layers(trainer.model) == 0


def _qlora_trainer(model, tokenizer, output_dir):
    torch.manual_seed(0)  # the same LoRA weights (init_lora_weights=False: non-zero B, gradients reach every A)
    lora = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    args = cpu_args(output_dir, per_device_train_batch_size=4)
    return KTOExtTrainer(
        model, args=args, train_dataset=make_kto_dataset(8, seed=1),
        eval_dataset=make_kto_dataset(4, seed=2), processing_class=tokenizer, peft_config=lora,
    )  # fmt: skip


def _lora_gradients(trainer):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, collated_batch(trainer, 4)).backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_4bit_layers_keep_their_gradient_through_evaluation(tmp_path, tiny_default):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place on its first no-grad eval forward, after
    which that layer has no backward: an evaluation between steps would train on with the gradient cut at every 4-bit
    layer (TRL's trainer does). The trainer keeps the standard layout: after `evaluate` the LoRA gradients equal those
    of a model never evaluated (on other CPUs nothing is repacked either way)."""
    model_dir = str(tiny_default.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=four_bit(), dtype=torch.float32)

    expected = _lora_gradients(_qlora_trainer(load(), tokenizer, tmp_path / "a"))
    assert expected and all(g.abs().max() > 0 for g in expected.values())
    trainer = _qlora_trainer(load(), tokenizer, tmp_path / "b")
    trainer.evaluate()
    assert repacked_layers(trainer.model) == 0
    got = _lora_gradients(trainer)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)

    looked_at = load()  # eval mode, as loaded
    with torch.no_grad():
        looked_at(input_ids=torch.tensor([[1, 5, 6, 7]]))
    if repacked_layers(looked_at):  # this CPU repacks: the trainer names the cause and the fix
        with pytest.raises(ValueError, match=r"4-bit layers of the model .* were repacked by bitsandbytes for its CPU "
                           r"inference kernel.* Load the model again and pass it to the trainer before running it"):  # fmt: skip
            _qlora_trainer(looked_at, tokenizer, tmp_path / "c")


def test_a_check_that_raises_leaves_the_model_on_trls_path_said_once(small_model, tiny_tokenizer, tmp_path, caplog,
                                                                     monkeypatch):  # fmt: skip
    """A kernel that refuses the check's call: one warning naming the error, then TRL's path, whose loss equals a
    float64 computation from the formula."""

    def refuses(*args, **kwargs):
        raise AssertionError("N must be divisible by block_n")

    monkeypatch.setattr(completion_module, "completion_logps", refuses)
    initial = copy.deepcopy(small_model)
    args = cpu_args(tmp_path, per_device_train_batch_size=4, beta=0.3)
    with caplog.at_level(logging.INFO, logger="trl_kto_ext.logprobs.fast_path"):
        trainer = KTOExtTrainer(
            model=small_model, args=args, train_dataset=odd_length_dataset(12, seed=3), processing_class=tiny_tokenizer
        )
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in trainer.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        batch = collated_batch(trainer, 4)
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        trainer.compute_loss(trainer.model, dict(batch))  # a second step: nothing more is said
    records = [r for r in caplog.records if r.name == "trl_kto_ext.logprobs.fast_path"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (
            logging.WARNING,
            "Using TRL's standard log-prob computation for the model (LlamaForCausalLM): its start-up check failed "
            "(AssertionError: N must be divisible by block_n); results are the same, only slower.",
        )
    ]
    assert list(fast_path(trainer)._verdict.values()) == [False, False]  # the policy and its reference copy
    target, kl = [batch[k] for k in KEYS], [batch[f"KL_{k}"] for k in KEYS]
    expected, _, _ = reference_kto(
        padded_logps(trainer.model, *target).tolist(),
        padded_logps(initial, *target).tolist(),
        padded_logps(trainer.model, *kl).tolist(),
        padded_logps(initial, *kl).tolist(),
        batch["label"].tolist(),
        0.3,
        trainer.loss_aversion.desirable_weight,
        1.0,
    )
    assert loss == pytest.approx(expected, rel=1e-5)


def test_an_error_trls_path_shares_is_raised_by_trls_path(small_model, tiny_tokenizer, tmp_path, caplog):
    """The check does not swallow an error the real step would meet: the backbone fails in the check (a warning) and
    again in TRL's path, which raises it."""

    def broken(*args, **kwargs):
        raise RuntimeError("backbone kernel missing for this device")

    small_model.model.forward = broken
    args = cpu_args(tmp_path, max_steps=1)
    trainer = KTOExtTrainer(
        model=small_model, args=args, train_dataset=odd_length_dataset(8, seed=3), processing_class=tiny_tokenizer
    )
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(RuntimeError, match="backbone kernel missing for this device"),
    ):
        trainer.train()
    assert "its start-up check failed (RuntimeError: backbone kernel missing for this device)" in caplog.text


def test_an_unwritable_reference_cache_costs_the_cache_not_the_run(small_model, tiny_tokenizer, tmp_path, caplog):
    """A cache folder that cannot be created: the reference log-probs are computed, used and not saved (one warning),
    and equal those computed with a writable cache."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    values = {}
    for name, cache_dir in (("writable", tmp_path / "cache"), ("unwritable", blocker / "cache")):
        args = cpu_args(
            tmp_path / name, precompute_ref_log_probs=True, kl_pairing="dataset", ref_cache_dir=str(cache_dir)
        )
        with caplog.at_level(logging.WARNING, logger="trl_kto_ext.logprobs.ref_cache"):
            caplog.clear()
            trainer = KTOExtTrainer(
                model=copy.deepcopy(small_model), args=args, train_dataset=odd_length_dataset(10, seed=3),
                processing_class=tiny_tokenizer,
            )  # fmt: skip
            trainer.train()
        values[name] = trainer.train_dataset["ref_logps"], trainer.train_dataset["ref_KL_logps"]
    assert "not cached: writing" in caplog.text and str(blocker / "cache") in caplog.text
    assert "set `ref_cache_dir` to a writable folder" in caplog.text.lower()
    assert not list(blocker.parent.glob("**/*.tmp"))
    for got, expected in zip(values["unwritable"], values["writable"]):
        assert got == pytest.approx(expected, rel=1e-6)
