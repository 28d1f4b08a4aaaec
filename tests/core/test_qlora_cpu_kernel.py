"""bitsandbytes repacks a 4-bit layer for its CPU inference kernel (no backward pass) the first time the layer runs in
eval mode; KTOExtTrainer keeps that off, so evaluating or generating before or during training leaves every LoRA
adapter its gradient, and a model repacked before it reached the trainer is refused with one line."""

import copy
import warnings

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from conftest import cpu_args
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset

REPACKS = has_avx512bf16()  # the repacking exists only on CPUs with AVX512-BF16


def _qlora_model(model_dir):
    base = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32,
    )
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def _eval_forward(model):
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    model.train()


def test_plain_bitsandbytes_loses_the_gradient_after_an_eval_forward(tiny_default):
    """The fault itself (so the test below can fail): without the trainer, one eval forward and LoRA gets no grad."""
    if not REPACKS:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model = _qlora_model(str(tiny_default.model_dir))
    _eval_forward(model)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    assert not [p for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert any("may lead to silently incorrect behavior" in str(w.message) for w in caught)


def test_lora_adapters_train_after_evaluation_and_generation(tiny_default, tmp_path):
    model_dir = str(tiny_default.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _qlora_model(model_dir)
    data = make_kto_dataset(16, seed=0)
    args = cpu_args(tmp_path, max_steps=1, per_device_train_batch_size=8, learning_rate=1e-2, eval_strategy="no")
    trainer = KTOExtTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.evaluate()  # eval mode, no gradient: where bitsandbytes would repack
    trainer.model.eval()
    trainer.model.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=2, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "silently incorrect" in str(w.message)]
    assert len(before) == 8  # q_proj and v_proj, lora_A and lora_B, 2 layers
    unchanged = [n for n, p in trainer.model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert unchanged == []  # every adapter tensor got a gradient and moved


def test_a_model_repacked_before_the_trainer_is_refused(tiny_default, tmp_path):
    if not REPACKS:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model_dir = str(tiny_default.model_dir)
    model = _qlora_model(model_dir)
    _eval_forward(copy.deepcopy(model))  # a copy: the original stays trainable
    KTOExtTrainer(model=model, args=cpu_args(tmp_path / "ok"), train_dataset=make_kto_dataset(8, seed=0),
                  processing_class=AutoTokenizer.from_pretrained(model_dir))  # fmt: skip
    repacked = _qlora_model(model_dir)
    _eval_forward(repacked)
    with pytest.raises(ValueError) as info:
        KTOExtTrainer(model=repacked, args=cpu_args(tmp_path / "bad"), train_dataset=make_kto_dataset(8, seed=0),
                      processing_class=AutoTokenizer.from_pretrained(model_dir))  # fmt: skip
    message = str(info.value)
    assert message.startswith("14 4-bit layers of the model (first: base_model.model.model.layers.0.self_attn.q_proj.")
    assert message.endswith("Load the model again and pass it to the trainer before running it (the trainer keeps the "
                            "repacking off from then on, evaluation and generation included).")  # fmt: skip
