"""The policy's KL rows continued from the prompt keys and values of its gradient pass give the full pass's log-probs
(float64 reference), leave the loss and gradients unchanged under every checkpointing mode, and fall back when a first
check fails."""

import itertools
import logging
import random

import pytest
import torch
from conftest import cpu_args
from peft import LoraConfig, get_peft_model
from test_fast_path import causal_only_attention, move_policy_, odd_length_dataset, padded_logps  # noqa: F401
from test_shared_prompt import float64_logps, random_rows, with_head

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.logprobs import prompt_reuse
from trl_kto_ext.logprobs.completion import completion_logps
from trl_kto_ext.logprobs.fast_path import fast_path
from trl_kto_ext.logprobs.shared_prompt import right_padded

KL_KEYS = ("KL_input_ids", "KL_attention_mask", "KL_completion_mask")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("n_rows,overhead", [(1, 64), (6, 0), (9, 10_000)])
def test_continuation_equals_unpadded_float64(small_model, attention, n_rows, overhead):
    """Prompts of 1-12 tokens (a 1-token prompt records nothing), empty and 1-token KL completions, batch 1, several
    recorded calls (rows split over two forwards in a shuffled order), one or many continuation buckets."""
    small_model.set_attn_implementation(attention)
    model = small_model.eval()
    settings = with_head(model)
    rng = random.Random(n_rows)
    prompts, completions = random_rows(rng, model.config.vocab_size, n_rows, 2)
    prompts[0] = prompts[0][:1]
    completions[0][1] = []
    completions[-1][1] = completions[-1][1][:1]
    kl = [c[1] for c in completions]
    recording = prompt_reuse.Recording(0, id(model), prompts, kl, [])
    order = list(range(n_rows))
    rng.shuffle(order)
    for rows in (order[: n_rows // 2], order[n_rows // 2 :]):
        if not rows:
            continue
        keep = max(len(prompts[i]) for i in rows) - 1
        recorder = prompt_reuse.PromptRecorder(model.config, keep) if keep > 0 else None
        recording.calls.append((rows, recorder))
        ids, mask = right_padded([prompts[i] + completions[i][0] for i in rows], 0, "cpu")
        model.model(input_ids=ids, attention_mask=mask, cache=recorder, use_cache=False)  # the target rows' pass
    assert prompt_reuse.complete(recording, model.config.num_hidden_layers)
    got = prompt_reuse.continued_kl_logps(model, settings, recording, pad_id=0, overhead_tokens=overhead)
    expected = torch.tensor([float64_logps(model, p, c) for p, c in zip(prompts, kl)], dtype=torch.float64)
    assert got[0].item() == 0.0  # an empty KL completion scores nothing
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_recorder_keeps_the_first_write_and_changes_nothing(small_model):
    """The pass with a recorder returns the cache-free pass's values; a second write (the backward's recompute under
    checkpointing) neither grows nor replaces what was recorded."""
    model = small_model.eval()
    with_head(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    mask = (ids != 0).long()
    completion = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]])
    plain = completion_logps(model, ids, mask, completion).log_probs
    recorder = prompt_reuse.PromptRecorder(model.config, keep=2)
    with_cache = completion_logps(model, ids, mask, completion, call_kwargs=lambda rows: {"cache": recorder}).log_probs
    assert torch.equal(plain, with_cache)
    first = {i: (k.clone(), v.clone()) for i, (k, v) in recorder.recorded.items()}
    assert len(first) == model.config.num_hidden_layers and first[0][0].shape[2] == 2
    completion_logps(
        model, ids.flip(0), mask.flip(0), completion.flip(0), call_kwargs=lambda rows: {"cache": recorder}
    )
    assert all(
        torch.equal(recorder.recorded[i][0], k) and torch.equal(recorder.recorded[i][1], v)
        for i, (k, v) in first.items()
    )
    recorder.close()  # after the KL rows are scored: memory freed, the backward's recompute records nothing
    completion_logps(model, ids, mask, completion, call_kwargs=lambda rows: {"cache": recorder})
    assert recorder.recorded == {}


def _trainer(model, tokenizer, tmp_path, checkpointing, **overrides):
    args = cpu_args(tmp_path, per_device_train_batch_size=5, **overrides)
    trainer = KTOExtTrainer(
        model=model, args=args, train_dataset=odd_length_dataset(23, seed=3), processing_class=tokenizer
    )
    if checkpointing is not None:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        if checkpointing:
            trainer.model.enable_input_require_grads()
    trainer.model.train()
    return trainer


def _step(trainer, batch):
    """(loss, flat gradient) of one batch."""
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    params = [p for p in trainer.model.parameters() if p.grad is not None]
    grad = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return loss.item(), grad


@pytest.mark.parametrize("use_lora", [False, True])
@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["no-checkpointing", "non-reentrant", "reentrant"])
def test_a_step_continues_the_kl_rows_and_keeps_loss_and_gradients(
    small_model, tiny_tokenizer, tmp_path, monkeypatch, use_lora, checkpointing
):
    """The KL rows' policy log-probs come from the continuation (every step) and equal a padded float64 pass over the
    KL rows; loss and gradients equal those of the same steps with the KL rows run in full."""
    model = small_model
    if use_lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    trainer = _trainer(model, tiny_tokenizer, tmp_path, checkpointing)
    move_policy_(trainer.model, use_lora, seed=1)
    assert trainer.model.is_gradient_checkpointing == (checkpointing is not None)
    continued = []
    original = prompt_reuse.continued_kl_logps

    def spy(*args, **kwargs):
        continued.append(original(*args, **kwargs))
        return continued[-1]

    monkeypatch.setattr(prompt_reuse, "continued_kl_logps", spy)
    batches = list(itertools.islice(iter(trainer.get_train_dataloader()), 3))
    results = [_step(trainer, batch) for batch in batches]
    path = trainer._fast_path
    assert len(continued) == len(batches) and list(path._reuse_verdict.values()) == [True]
    for values, batch in zip(continued, batches):
        expected = padded_logps(trainer.model, *(batch[k] for k in KL_KEYS))
        assert torch.allclose(values.double(), expected, rtol=1e-5, atol=1e-5)
    path._reuse_verdict = {key: False for key in path._reuse_verdict}  # the KL rows in full, prompt included
    for (loss, grad), batch in zip(results, batches):
        full_loss, full_grad = _step(trainer, batch)
        assert loss == pytest.approx(full_loss, rel=1e-5)
        assert torch.allclose(grad, full_grad, rtol=1e-4, atol=1e-7)
    assert len(continued) == len(batches)


def test_kl_subset_runs_the_kl_rows_in_full(small_model, tiny_tokenizer, tmp_path, monkeypatch):
    """With `kl_subset_size` the KL rows are not row i's prompt for every i: nothing is recorded."""
    trainer = _trainer(small_model, tiny_tokenizer, tmp_path, None, kl_subset_size=2)
    monkeypatch.setattr(prompt_reuse, "PromptRecorder", None)  # would raise if a recorder were made
    batch = next(iter(trainer.get_train_dataloader()))
    _step(trainer, batch)
    assert not trainer._fast_path._reuse_verdict


def test_falls_back_where_the_continuation_gives_other_values(
    small_model,
    tiny_tokenizer,
    tmp_path,
    caplog,
    causal_only_attention,  # noqa: F811
):
    """A kernel that ignores the padding mask is exact on right-padded rows but not when continuing from a masked
    prefix: the first check fails, the reason is logged once, and every step's KL values come from the full pass."""
    small_model.set_attn_implementation(causal_only_attention)
    trainer = _trainer(small_model, tiny_tokenizer, tmp_path, None)
    path = fast_path(trainer)
    returned = []
    original = path.policy_kl_logps

    def spy(model, batch, fallback):
        returned.append((original(model, batch, fallback), batch))
        return returned[-1][0]

    path.policy_kl_logps = spy
    with caplog.at_level(logging.INFO, logger="trl_kto_ext"):
        for batch in itertools.islice(iter(trainer.get_train_dataloader()), 3):
            _step(trainer, batch)
    said = "Running the policy's KL rows in full (prompt included) for the model (LlamaForCausalLM): its continued KL"
    assert caplog.text.count(said) == 1
    assert list(path._reuse_verdict.values()) == [False]
    assert len(returned) == 3
    for values, batch in returned:
        expected = padded_logps(trainer.model, *(batch[k] for k in KL_KEYS))
        assert torch.allclose(values.double(), expected, rtol=1e-5, atol=1e-5)
