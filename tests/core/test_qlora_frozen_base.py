"""A QLoRA run leaves the frozen 4-bit base as loaded: bitsandbytes (0.50) rounds each `Linear4bit` bias to the compute
dtype in place at every forward; the trainer keeps the loaded bias (TRL's `test_peft_with_quantization` checks this on
a Qwen2, whose attention projections carry biases)."""

import pytest
import torch
from conftest import cpu_args
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, tiny_default):
    from trl_kto_ext.models.tiny import build_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(build_tokenizer()), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)  # values fp16 cannot hold exactly, so a rounding would show
    folder = tmp_path_factory.mktemp("qwen2-bias")
    model.save_pretrained(folder)
    return folder


def _quantized(qwen2_dir):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float16)  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32, quantization_config=quantization)


def test_qlora_training_leaves_the_frozen_base_as_loaded(qwen2_dir, tiny_tokenizer, tmp_path):
    model = _quantized(qwen2_dir)
    loaded = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    assert len(loaded) == 6 and all(b.dtype == torch.float32 for b in loaded.values())  # q, k, v of 2 layers
    args = cpu_args(tmp_path, max_steps=2, learning_rate=0.1, per_device_train_batch_size=4)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = KTOExtTrainer(model=model, args=args, train_dataset=make_kto_dataset(16, seed=0),
                            processing_class=tiny_tokenizer, peft_config=peft_config)  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    for name, value in before.items():
        if "lora_" in name:
            assert not torch.equal(value, after[name]), f"{name} did not train"
        else:  # the frozen base: same dtype, same values
            assert after[name].dtype == value.dtype, name
            torch.testing.assert_close(after[name].detach(), value, rtol=0, atol=0, msg=name)
    kept = {n: p for n, p in after.items() if n.endswith("bias")}
    for name, value in loaded.items():  # each loaded bias, wrapped by LoRA (q, v) or not (k)
        (match,) = [p for n, p in kept.items() if n.endswith(name.replace(".bias", "").split("model.", 1)[1] + ".bias")
                    or n.endswith(name.replace(".bias", ".base_layer.bias").split("model.", 1)[1])]  # fmt: skip
        torch.testing.assert_close(match.detach(), value, rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_base_biases_with_an_adapters_off_reference_are_refused(qwen2_dir, tiny_tokenizer, tmp_path, bias):
    """LoRA bias="all"/"lora_only" trains base biases, which disabling the adapters keeps: the reference would move."""
    model = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"trainable parameters are not part of the adapters \(first: .*bias\).*"
                       r"LoraConfig\(bias='none'\)"):  # fmt: skip
        KTOExtTrainer(model=model, args=cpu_args(tmp_path), train_dataset=make_kto_dataset(16, seed=0),
                      processing_class=tiny_tokenizer, peft_config=peft_config)  # fmt: skip


def test_modules_to_save_train_with_an_adapters_off_reference(qwen2_dir, tiny_tokenizer, tmp_path):
    """A fully trained module of the adapter (`modules_to_save`) is the adapter's: disabling it restores the base."""
    model = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                             task_type="CAUSAL_LM")  # fmt: skip
    trainer = KTOExtTrainer(model=model, args=cpu_args(tmp_path, max_steps=1), processing_class=tiny_tokenizer,
                            train_dataset=make_kto_dataset(16, seed=0), peft_config=peft_config)  # fmt: skip
    trainer.train()
