"""The special tokens of every tokenized row, per tokenizer shape: exact ids of plain-text and conversational rows."""

import logging

import pytest
import tokenizer_shapes as shapes
from conftest import cpu_args
from datasets import Dataset
from tokenizer_shapes import ids, token_id

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.data.special_tokens import added_tokens, text_prompt_ids
from trl_kto_ext.models.tiny import build_model

BOS, EOS = token_id("<s>"), token_id("</s>")
USER, ASSISTANT = token_id("<|user|>"), token_id("<|assistant|>")
IM_START, IM_END, NEWLINE = token_id("<|im_start|>"), token_id("<|im_end|>"), token_id("\n")
LOGGER = "trl_kto_ext.data.special_tokens"

TEXT = Dataset.from_dict({"prompt": ["7+8=", "2+2="], "completion": ["15", "5"], "label": [True, False]})
CHAT = Dataset.from_dict(
    {
        "prompt": [[{"role": "user", "content": "7+8="}], [{"role": "user", "content": "2+2="}]],
        "completion": [[{"role": "assistant", "content": "15"}], [{"role": "assistant", "content": "5"}]],
        "label": [True, False],
    }
)
# The tiny template: BOS, role tags as single tokens, the assistant turn closed by EOS.
TINY_CHAT_ROWS = [
    ([BOS, USER, *ids("7+8="), ASSISTANT], [*ids("15"), EOS]),
    ([BOS, USER, *ids("2+2="), ASSISTANT], [*ids("5"), EOS]),
]
# ChatML: `<|im_start|>role\ncontent<|im_end|>\n`; the assistant turn ends with <|im_end|> and a newline.
CHATML_ROWS = [
    ([IM_START, *ids("user\n7+8="), IM_END, NEWLINE, IM_START, *ids("assistant\n")], [*ids("15"), IM_END, NEWLINE]),
    ([IM_START, *ids("user\n2+2="), IM_END, NEWLINE, IM_START, *ids("assistant\n")], [*ids("5"), IM_END, NEWLINE]),
]


def tokenized_rows(tokenizer, dataset, tmp_path):
    """(prompt_ids, completion_ids) of each row as the trainer will train on them."""
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    trainer = KTOExtTrainer(model, args=cpu_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    return [(row["prompt_ids"], row["completion_ids"]) for row in trainer.train_dataset]


def special_token_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("dataset,expected", [(TEXT, "text"), (CHAT, "chat")])
def test_tiny_tokenizer_adds_bos_and_trl_the_eos(tiny_tokenizer, tmp_path, caplog, dataset, expected):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rows = tokenized_rows(tiny_tokenizer, dataset, tmp_path)
    if expected == "text":
        assert rows == [([BOS, *ids("7+8=")], [*ids("15"), EOS]), ([BOS, *ids("2+2=")], [*ids("5"), EOS])]
    else:
        assert rows == TINY_CHAT_ROWS
    assert special_token_lines(caplog) == []


def test_tokenizer_that_adds_nothing(tmp_path):
    """GPT-2 / Qwen shape: no BOS; the completion ends with the EOS that TRL appends."""
    assert tokenized_rows(shapes.adds_nothing(), TEXT, tmp_path) == [
        (ids("7+8="), [*ids("15"), EOS]),
        (ids("2+2="), [*ids("5"), EOS]),
    ]


def test_tokenizer_that_appends_eos_gives_one_eos(tmp_path, caplog):
    """A `<s> $A </s>` post-processor (`add_eos_token=True`): TRL's rows end `15</s></s>`; here one EOS, as the same
    rows as conversations get, and a completion whose text already ends with the EOS text gets one too."""
    tokenizer = shapes.appends_eos()
    assert added_tokens(tokenizer) == ([BOS], [EOS])
    dataset = Dataset.from_dict(
        {"prompt": ["7+8=", "2+2=", "1+1="], "completion": ["15", "5", "2</s>"], "label": [True, False, True]}
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rows = tokenized_rows(tokenizer, dataset, tmp_path / "text")
    assert rows == [
        ([BOS, *ids("7+8=")], [*ids("15"), EOS]),
        ([BOS, *ids("2+2=")], [*ids("5"), EOS]),
        ([BOS, *ids("1+1=")], [*ids("2"), EOS]),
    ]
    assert special_token_lines(caplog) == [
        "train dataset: the tokenizer appends '</s>' to every text, after the EOS '</s>' that ends each completion: "
        "dropped from the completions (3 of 3 rows), which end with one EOS, as conversational rows do."
    ]
    assert tokenized_rows(tokenizer, CHAT, tmp_path / "chat") == TINY_CHAT_ROWS
    # an online prompt does not end with the appended EOS either (generation would start after it)
    assert text_prompt_ids(tokenizer, tokenizer("7+8=")["input_ids"]) == [BOS, *ids("7+8=")]


def test_prompt_that_starts_with_the_bos_text_keeps_one_bos(tiny_tokenizer, tmp_path, caplog):
    """A prompt rendered by hand with the BOS text, through a tokenizer that adds BOS: one BOS, said once."""
    dataset = Dataset.from_dict({"prompt": ["<s>7+8=", "2+2="], "completion": ["15", "5"], "label": [True, False]})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rows = tokenized_rows(tiny_tokenizer, dataset, tmp_path)
    assert rows == [([BOS, *ids("7+8=")], [*ids("15"), EOS]), ([BOS, *ids("2+2=")], [*ids("5"), EOS])]
    assert special_token_lines(caplog) == [
        "train dataset: prompts that already start with the BOS text '<s>' get a second BOS from the tokenizer: one "
        "dropped (1 of 2 rows)."
    ]
    # an online prompt likewise
    assert text_prompt_ids(tiny_tokenizer, tiny_tokenizer("<s>7+8=")["input_ids"]) == [BOS, *ids("7+8=")]


def test_tokenizer_without_eos(tmp_path):
    """No EOS token (pad set): plain-text completions cannot end, so the run stops naming the token and the fix
    (TRL: `TypeError: endswith first arg must be str ... not NoneType`); conversational rows end with the template's
    end of turn and train."""
    tokenizer = shapes.without_eos()
    assert tokenizer.eos_token is None and tokenizer.pad_token == "<pad>"
    with pytest.raises(ValueError) as error:
        tokenized_rows(tokenizer, TEXT, tmp_path / "text")
    assert str(error.value) == (
        "The tokenizer has no EOS token, so the plain-text completions of the train dataset cannot be ended: the "
        "model would never learn to stop. Set the token that ends a text for this model before creating the trainer "
        "(e.g. `tokenizer.eos_token = '</s>'`, the token whose id is `eos_token_id` in the model's generation "
        "config), or give conversational rows (lists of messages), which end with the chat template's end of turn."
    )
    assert tokenized_rows(tokenizer, CHAT, tmp_path / "chat") == CHATML_ROWS


def test_chat_template_whose_end_of_turn_is_not_eos(tmp_path, caplog):
    """ChatML with EOS `</s>`: conversational completions end with the template's `<|im_end|>` and newline (no EOS
    added), plain-text completions with EOS."""
    tokenizer = shapes.chatml()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert tokenized_rows(tokenizer, CHAT, tmp_path / "chat") == CHATML_ROWS
        assert tokenized_rows(tokenizer, TEXT, tmp_path / "text") == [
            (ids("7+8="), [*ids("15"), EOS]),
            (ids("2+2="), [*ids("5"), EOS]),
        ]
    assert special_token_lines(caplog) == []


def test_chat_template_that_never_ends_the_turn_is_said(tmp_path, caplog):
    tokenizer = shapes.build(
        single=None,
        chat_template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rows = tokenized_rows(tokenizer, CHAT, tmp_path)
    assert rows[0] == (ids("user: 7+8=\nassistant: "), ids("15\n"))
    assert special_token_lines(caplog) == [
        "train dataset: the chat template ends the assistant turn with no special token (the first completion ends "
        "with '1' '5' '\\n'), so the model is not trained to stop. Use a chat template that closes each assistant "
        "turn with an end-of-turn or EOS token."
    ]


def test_eos_text_that_is_not_the_eos_token_stops_the_run(tmp_path):
    """`tokenizer.eos_token = 'END'` where END is not a token: the completions would end with 'D', not an EOS."""
    tokenizer = shapes.build()
    tokenizer.eos_token = "END"
    with pytest.raises(ValueError, match=r"The completion at row 0 \(counting from 0\) of the train dataset ends with "
                       r"'D', not with the EOS token 'END' \(id 3\) \(2 rows end so: 0, 1\).*Set `tokenizer.eos_token` "
                       r"to a token of the tokenizer's vocabulary"):  # fmt: skip
        tokenized_rows(tokenizer, TEXT, tmp_path)


@pytest.mark.parametrize("shape", ["appends_eos", "without_eos"])
def test_online_prompts_and_samples(tiny_default, tmp_path, shape):
    """Online KTO tokenizes prompts itself: with an EOS-appending tokenizer the prompt does not end with EOS (the
    model would be asked to continue after the end of a text); without an EOS token sampling still runs, to
    `max_completion_length`. Every sampled completion holds at most one EOS, at its end."""
    from test_online import make_trainer, prompt_rows

    tokenizer = getattr(shapes, shape)()
    trainer = make_trainer(tiny_default, tmp_path)
    trainer.processing_class = trainer._tokenizer = tokenizer
    examples = trainer.sample(prompt_rows(2))
    for example in examples:
        assert example["prompt_ids"] == [BOS, *ids(example["prompt"])]
        completion = example["completion_ids"]
        assert EOS not in completion[:-1]
        if shape == "without_eos":
            assert len(completion) == trainer.args.max_completion_length or completion[-1:] == [EOS]
