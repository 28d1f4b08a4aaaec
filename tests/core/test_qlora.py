"""QLoRA with KTOExtTrainer: 4-bit NF4 base (bitsandbytes), LoRA on top, gradient checkpointing, reference = the
4-bit base with adapters off; and the fail-fast message when bitsandbytes has no backend for the device."""

import math
import sys

import pytest
import torch
from conftest import collated_batch, logged_losses, sequence_logps
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_kto_ext import KTOExtConfig, KTOExtTrainer
from trl_kto_ext.models.tiny import make_kto_dataset
from trl_kto_ext.training.kbit_layers import keep_4bit_layers_trainable
from trl_kto_ext.training.peft_utils import check_kbit_backend

QLORA_STEPS = 24
QLORA_ROWS = 16  # a small set seen several times at a high learning rate: the loss must go down
COMPUTE_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
# Reference path vs an independently loaded 4-bit base: same kernels, so only reduction-order noise (on CUDA the
# independent computation rounds the logits to bf16 first).
TOLERANCE = {"cpu": dict(rtol=1e-5, atol=1e-4), "cuda": dict(rtol=2e-2, atol=0.25)}
# Trained model vs its adapter saved and reloaded: the trainer keeps the adapters in bf16 (QLoRA recipe), PEFT reloads
# them in fp32.
ROUNDTRIP_TOLERANCE = {"cpu": dict(rtol=1e-2, atol=5e-2), "cuda": dict(rtol=5e-2, atol=0.5)}


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model: a second thread only waits


@pytest.fixture(scope="module")
def model_dir(tiny_default):
    return str(tiny_default.model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def quantization_config(device):
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=COMPUTE_DTYPE[device],
    )


def load_4bit_base(model_dir, device):
    base = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quantization_config(device),
        dtype=COMPUTE_DTYPE[device],
        device_map={"": device},
    ).eval()
    keep_4bit_layers_trainable(base)  # the kernels the trainer runs (bitsandbytes' CPU repacking kept off)
    return base


def lora_config():
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def make_args(output_dir, device, **overrides):
    values = dict(
        output_dir=str(output_dir),
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        model_init_kwargs={"dtype": str(COMPUTE_DTYPE[device]).removeprefix("torch.")},
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        max_steps=QLORA_STEPS,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return KTOExtConfig(**values)


def checkpointing_on(model):
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


class _CheckpointingProbe(TrainerCallback):
    """Records, at every optimizer step, whether the decoder layers run with activation checkpointing."""

    def __init__(self):
        self.states = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states.append(checkpointing_on(model))


def run_qlora(model_dir, tokenizer, output_dir, device):
    check_kbit_backend(device)  # fail fast, before the model is loaded
    probe = _CheckpointingProbe()
    trainer = KTOExtTrainer(
        model_dir,
        args=make_args(output_dir, device),
        train_dataset=make_kto_dataset(QLORA_ROWS, seed=7),
        processing_class=tokenizer,
        quantization_config=quantization_config(device),
        peft_config=lora_config(),
        callbacks=[probe],
    )
    trainer.train()
    trainer.model.eval()
    return trainer, probe


def check_trained(trainer, probe):
    losses = logged_losses(trainer)
    assert len(losses) == QLORA_STEPS and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.01, f"loss did not go down: first steps {losses[:5]}, last steps {losses[-5:]}"
    assert probe.states and all(probe.states), "gradient checkpointing was not on during training"

    assert trainer.ref_model is None
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    trainable = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any(p.abs().max() > 0 for name, p in trainable.items() if "lora_B" in name)  # the adapter moved


def check_reference_is_4bit_base(trainer, model_dir, device, min_adapter_effect=1e-2):
    base = load_4bit_base(model_dir, device)
    batch = collated_batch(trainer)
    expected = sequence_logps(base, batch)
    torch.testing.assert_close(trainer._reference_target_logps(batch), expected, **TOLERANCE[device])
    torch.testing.assert_close(
        trainer._reference_kl_logps(batch), sequence_logps(base, batch, prefix="KL_"), **TOLERANCE[device]
    )
    # The adapters change the policy (after a real run), and are active again after the reference forwards.
    assert (sequence_logps(trainer.model, batch) - expected).abs().max() >= min_adapter_effect


def check_adapter_roundtrip(trainer, model_dir, output_dir, device):
    trainer.save_model(str(output_dir))
    files = {p.name for p in output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}

    batch = collated_batch(trainer)
    trained = sequence_logps(trainer.model, batch)
    reloaded = PeftModel.from_pretrained(load_4bit_base(model_dir, device), str(output_dir)).eval()
    assert reloaded.get_base_model().is_loaded_in_4bit
    # The sums differ by bf16 rounding only, far less than what the adapter itself changed.
    torch.testing.assert_close(sequence_logps(reloaded, batch), trained, **ROUNDTRIP_TOLERANCE[device])
    with reloaded.disable_adapter():
        adapter_effect = (sequence_logps(reloaded, batch) - trained).abs().max()
    assert adapter_effect > 4 * ROUNDTRIP_TOLERANCE[device]["atol"]


# ---------------------------------------------------------------------------------------------------------- CPU
@pytest.fixture(scope="module")
def cpu_run(model_dir, tokenizer, tmp_path_factory):
    return run_qlora(model_dir, tokenizer, tmp_path_factory.mktemp("qlora-cpu"), "cpu")


def test_qlora_trains_on_cpu(cpu_run):
    check_trained(*cpu_run)


def test_qlora_reference_is_4bit_base_with_adapters_off(cpu_run, model_dir):
    check_reference_is_4bit_base(cpu_run[0], model_dir, "cpu")


def test_qlora_adapter_saves_and_reloads_onto_4bit_base(cpu_run, model_dir, tmp_path):
    check_adapter_roundtrip(cpu_run[0], model_dir, tmp_path / "adapter", "cpu")


def test_qlora_on_a_model_loaded_and_prepared_by_hand(tmp_path, model_dir, tokenizer):
    model = load_4bit_base(model_dir, "cpu")
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    trainer = KTOExtTrainer(
        model,
        args=make_args(tmp_path, "cpu", max_steps=3, model_init_kwargs=None),
        train_dataset=make_kto_dataset(8, seed=9),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    assert all(math.isfinite(x) for x in logged_losses(trainer))
    assert trainer.ref_model is None and checkpointing_on(trainer.model)
    trainer.model.eval()
    check_reference_is_4bit_base(trainer, model_dir, "cpu", min_adapter_effect=0.0)


def test_qlora_with_precomputed_reference(tmp_path, model_dir, tokenizer):
    trainer = KTOExtTrainer(
        model_dir,
        args=make_args(tmp_path, "cpu", max_steps=3, precompute_ref_log_probs=True, learning_rate=1e-2),
        train_dataset=make_kto_dataset(8, seed=10),
        processing_class=tokenizer,
        quantization_config=quantization_config("cpu"),
        peft_config=lora_config(),
    )
    trainer.train()
    assert all(math.isfinite(x) for x in logged_losses(trainer))
    assert trainer.ref_model is None and "ref_logps" in trainer.train_dataset.column_names
    trainer.model.eval()
    batch = collated_batch(trainer)
    assert "ref_logps" in batch  # the cached values, computed with the adapters off
    torch.testing.assert_close(
        trainer._reference_target_logps(batch),
        sequence_logps(load_4bit_base(model_dir, "cpu"), batch),
        **TOLERANCE["cpu"],
    )
    check_reference_is_4bit_base(trainer, model_dir, "cpu", min_adapter_effect=1e-3)


def test_yaml_model_config_maps_to_qlora(tmp_path, model_dir, tokenizer):
    model_args = ModelConfig(
        model_name_or_path=model_dir,
        dtype="float32",
        use_peft=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
    )
    config = get_quantization_config(model_args)
    expected = quantization_config("cpu")
    for key in ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
        assert getattr(config, key) == getattr(expected, key), key
    trainer = KTOExtTrainer(
        model_args.model_name_or_path,
        args=make_args(tmp_path, "cpu", max_steps=2),
        train_dataset=make_kto_dataset(8, seed=8),
        processing_class=tokenizer,
        quantization_config=config,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    assert all(math.isfinite(x) for x in logged_losses(trainer))
    assert trainer.ref_model is None and trainer.model.get_base_model().is_loaded_in_4bit


# ------------------------------------------------------------------------------------------- backend check
def test_check_kbit_backend_passes_on_cpu():
    check_kbit_backend("cpu")


def _assert_clear_message(err, device):
    message = str(err.value)
    assert "bitsandbytes" in message and f"'{device}'" in message
    assert "LoRA" in message and "peft_config=LoraConfig" in message and "load_in_4bit: false" in message


def test_check_kbit_backend_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(RuntimeError, match="import bitsandbytes") as err:
        check_kbit_backend("cpu")
    _assert_clear_message(err, "cpu")


def test_check_kbit_backend_without_kernel_for_device(monkeypatch):
    import bitsandbytes.functional

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend.")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    with pytest.raises(RuntimeError, match="Could not run 'bitsandbytes::quantize_4bit'") as err:
        check_kbit_backend("cpu")
    _assert_clear_message(err, "cpu")


def test_check_kbit_backend_for_unsupported_device(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(RuntimeError, match="supports only") as err:
        check_kbit_backend("cpu")
    _assert_clear_message(err, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_check_kbit_backend_cuda_without_gpu():
    with pytest.raises(RuntimeError) as err:
        check_kbit_backend("cuda:0")
    _assert_clear_message(err, "cuda")


# --------------------------------------------------------------------------------------------------------- CUDA
@pytest.fixture(scope="module")
def cuda_run(model_dir, tokenizer, tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return run_qlora(model_dir, tokenizer, tmp_path_factory.mktemp("qlora-cuda"), "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_trains_on_cuda_bf16(cuda_run):
    trainer, probe = cuda_run
    check_trained(trainer, probe)
    assert trainer.args.bf16 and trainer.model.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_reference_is_4bit_base_on_cuda(cuda_run, model_dir):
    check_reference_is_4bit_base(cuda_run[0], model_dir, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_adapter_roundtrip_on_cuda(cuda_run, model_dir, tmp_path):
    check_adapter_roundtrip(cuda_run[0], model_dir, tmp_path / "adapter", "cuda")
