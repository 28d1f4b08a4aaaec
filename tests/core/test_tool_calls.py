"""Tool calling and other message shapes: accepted whenever the chat template renders them, as TRL's KTOTrainer
does; refused (with the row and the reason) only when rendering fails or shows nothing of the completion."""

from __future__ import annotations

import copy

import pytest
from conftest import cpu_args
from datasets import Dataset
from trl import KTOConfig, KTOTrainer

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.data.loading import prepare_unpaired

# The tiny tokenizer is character level: this template renders tools, tool calls, tool results, content parts and
# reasoning with characters of its alphabet only.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{{ '<|system|>tools:' }}{% for tool in tools %}{{ ' ' + tool['function']['name'] }}"
    "{% endfor %}{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{{ '<|user|>result: ' + message['content'] }}{% else %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['reasoning_content'] %}{{ 'think: ' + message['reasoning_content'] + '. ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% elif message['content'] %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% for call in message['tool_calls'] or [] %}{{ 'call ' + call['function']['name'] + '(' }}"
    "{% for key, value in call['function']['arguments'].items() %}{{ key + '=' + value|string }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}{{ ')' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {}}}]


def _call(a, b):
    return [{"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]


def _tool_rows(content=None) -> Dataset:
    rows = []
    for i in range(8):
        a, b = 10 + i, 3
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                "completion": [
                    {"role": "assistant", "content": content, "tool_calls": _call(a, b if i % 2 else b + 1)}
                ],
                "label": i % 2 == 1,
                "tools": TOOLS,
            }
        )
    return Dataset.from_list(rows)


@pytest.fixture
def tool_tokenizer(tiny_tokenizer):
    tiny_tokenizer.chat_template = TOOL_TEMPLATE
    return tiny_tokenizer


@pytest.mark.parametrize("content", [None, ""], ids=["content-None", "content-empty"])
def test_tool_call_completions_train_as_in_trl(small_model, tool_tokenizer, tmp_path, content):
    dataset = _tool_rows(content)
    trl_args = KTOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                         report_to="none", per_device_train_batch_size=4, max_steps=2)  # fmt: skip
    reference = KTOTrainer(model=copy.deepcopy(small_model), ref_model=copy.deepcopy(small_model), args=trl_args,
                           train_dataset=dataset, processing_class=tool_tokenizer)  # fmt: skip
    assert prepare_unpaired(dataset)["label"] == dataset["label"]  # the Python loader accepts them too
    args = cpu_args(tmp_path, max_steps=2, per_device_train_batch_size=4, train_sampling_strategy="sequential")
    trainer = KTOExtTrainer(model=small_model, args=args, train_dataset=dataset, processing_class=tool_tokenizer)
    first = trainer.train_dataset[0]
    assert tool_tokenizer.decode(first["prompt_ids"]) == "<s><|system|>tools: add<|user|>What is 10+3?<|assistant|>"
    assert tool_tokenizer.decode(first["completion_ids"]) == "call add(a=10, b=4)</s>"
    assert trainer.train_dataset["prompt_ids"] == reference.train_dataset["prompt_ids"]
    assert trainer.train_dataset["completion_ids"] == reference.train_dataset["completion_ids"]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_tool_results_content_parts_and_reasoning(small_model, tool_tokenizer, tmp_path):
    prompt = [
        {"role": "user", "content": "What is 10+3?"},
        {"role": "assistant", "content": None, "tool_calls": _call(10, 3)},
        {"role": "tool", "content": "13"},
    ]
    rows = [
        {"prompt": prompt, "label": answer == "13", "completion": [
            {"role": "assistant", "content": [{"type": "text", "text": answer}], "reasoning_content": "sum"}]}
        for answer in ("13", "14", "13", "12")
    ]  # fmt: skip
    args = cpu_args(tmp_path, max_steps=1)
    trainer = KTOExtTrainer(
        model=small_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tool_tokenizer
    )
    first = trainer.train_dataset[0]
    assert tool_tokenizer.decode(first["prompt_ids"]) == (
        "<s><|user|>What is 10+3?<|assistant|>call add(a=10, b=3)</s><|user|>result: 13<|assistant|>"
    )
    assert tool_tokenizer.decode(first["completion_ids"]) == "think: sum. 13</s>"


def test_template_that_cannot_render_the_call_is_refused(small_model, tiny_tokenizer, tmp_path):
    # The tiny default template concatenates `content` as text: None cannot be rendered.
    with pytest.raises(ValueError) as err:
        KTOExtTrainer(model=small_model, args=cpu_args(tmp_path), train_dataset=_tool_rows(None),
                      processing_class=tiny_tokenizer)  # fmt: skip
    assert str(err.value).startswith(
        "completion at row 0 (counting from 0) of the train dataset cannot be rendered by the tokenizer's chat template ("
    )
    assert "content" in str(err.value)  # the template's own error names what it could not render
    assert str(err.value).endswith(
        "Use a chat template that supports these messages (tool calls, content parts, ...) or convert that row's "
        "messages to plain text content."
    )


def test_template_that_ignores_the_call_is_refused(small_model, tiny_tokenizer, tmp_path):
    # With content "" the tiny template renders the turn, but not its tool call: the completion would be empty.
    with pytest.raises(ValueError) as err:
        KTOExtTrainer(model=small_model, args=cpu_args(tmp_path), train_dataset=_tool_rows(""),
                      processing_class=tiny_tokenizer)  # fmt: skip
    assert str(err.value) == (
        "completion at row 0 (counting from 0) of the train dataset renders no text with the tokenizer's chat template: the template "
        "does not show its ['tool_calls'], so KTO would train on nothing there. Use a chat template that renders "
        "them (e.g. the model's own, with tool calls) or drop such rows."
    )
