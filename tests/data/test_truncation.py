"""truncation_mode="keep_end": a long conversation keeps its system turn and whole final turns, exactly the end of its
full rendering, with the completion untouched; text prompts keep their last tokens; the trainer keeps the rows."""

import logging

from conftest import cpu_args
from datasets import Dataset

from trl_kto_ext import KTOExtTrainer
from trl_kto_ext.data.truncation import shorten_row
from trl_kto_ext.models.tiny import build_tokenizer

# ChatML-style, on the tiny tokenizer's role tokens: each turn is <|role|> content EOS newline.
CHATML = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# The same, injecting a default system turn when the conversation has none (as SmolLM2's template does).
CHATML_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|system|>You are small.' + eos_token + '\n' }}{% endif %}" + CHATML
)
SYSTEM = {"role": "system", "content": "Answer with a number."}
TURNS = [
    {"role": "user", "content": "What is 12+30? Think about it carefully."},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And 7+8? Please show me the sum."},
    {"role": "assistant", "content": "15"},
    {"role": "user", "content": "Now 5+5?"},
]
COMPLETION = [{"role": "assistant", "content": "10"}]


def tokenizer_with(template):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def render(tokenizer, messages, generation=True):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def tokenized_row(tokenizer, prompt):
    prompt_ids = render(tokenizer, prompt)
    full = render(tokenizer, prompt + COMPLETION, generation=False)
    assert full[: len(prompt_ids)] == prompt_ids
    return {"prompt": prompt, "prompt_ids": prompt_ids, "completion_ids": full[len(prompt_ids) :]}


def check_kept(tokenizer, prompt, expected_turns, system_ids):
    """Shortens `prompt` to a budget that fits `expected_turns` (+2 tokens) but not one more turn, and checks the
    kept ids: the rendering of `expected_turns`, equal to the system turn's ids followed by the end of the full
    rendering, the completion untouched."""
    row = tokenized_row(tokenizer, prompt)
    full, completion = row["prompt_ids"], list(row["completion_ids"])
    expected = render(tokenizer, expected_turns)
    max_length = len(expected) + len(completion) + 2
    out = shorten_row(row, max_length, tokenizer, tokenizer.bos_token_id)
    kept = out["prompt_ids"]
    assert kept == expected
    assert kept[: len(system_ids)] == system_ids == full[: len(system_ids)]
    assert kept[len(system_ids) :] == full[len(full) - (len(kept) - len(system_ids)) :]
    assert list(row["completion_ids"]) == completion and "completion_ids" not in out
    assert len(kept) + len(completion) <= max_length
    return max_length, row


def test_six_turn_conversation_keeps_the_system_turn_and_whole_final_turns():
    tokenizer = tokenizer_with(CHATML)
    prompt = [SYSTEM, *TURNS]  # six turns, then the assistant's completion
    system_ids = render(tokenizer, [SYSTEM], generation=False)
    max_length, row = check_kept(tokenizer, prompt, [SYSTEM, *TURNS[2:]], system_ids)  # u2 a2 u3 fit; u1 a1 do not
    assert len(render(tokenizer, [SYSTEM, *TURNS[0:]])) + len(row["completion_ids"]) > max_length


def test_a_template_that_injects_its_own_system_turn_keeps_it():
    tokenizer = tokenizer_with(CHATML_DEFAULT_SYSTEM)
    prompt = list(TURNS)  # five turns after the injected system turn: six in the rendering
    injected = render(tokenizer_with(CHATML), [{"role": "system", "content": "You are small."}], generation=False)
    check_kept(tokenizer, prompt, TURNS[2:], injected)


def test_no_whole_turn_fits_keeps_the_last_tokens():
    tokenizer = tokenizer_with(CHATML)
    row = tokenized_row(tokenizer, [SYSTEM, *TURNS])
    budget = 9
    kept = shorten_row(row, budget + len(row["completion_ids"]), tokenizer, tokenizer.bos_token_id)["prompt_ids"]
    assert kept == row["prompt_ids"][-budget:]


def test_text_prompt_keeps_bos_and_its_last_tokens():
    tokenizer = build_tokenizer()
    prompt_ids = tokenizer("Long context: 1+1=2, 2+2=4, 3+3=6. What is 4+4?").input_ids
    completion_ids = tokenizer("8</s>", add_special_tokens=False).input_ids
    row = {"prompt": "unused", "prompt_ids": prompt_ids, "completion_ids": completion_ids}
    kept = shorten_row(row, 12, tokenizer, tokenizer.bos_token_id)["prompt_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert kept == [tokenizer.bos_token_id, *prompt_ids[-(12 - len(completion_ids) - 1) :]]
    short = {"prompt": "x", "prompt_ids": prompt_ids[:3], "completion_ids": completion_ids}
    assert shorten_row(short, 12, tokenizer, tokenizer.bos_token_id)["prompt_ids"] == prompt_ids[:3]  # fits already


def test_trainer_keeps_long_conversations_and_says_how_many(tmp_path, small_model, caplog):
    tokenizer = tokenizer_with(CHATML)
    contents = ["Be brief.", "1+1?", "2", "2+2?", "4", "3+3?"]  # six short turns: the tiny model has 64 positions
    conversation = [{"role": r, "content": c} for r, c in zip(["system", *["user", "assistant"] * 3], contents)]
    rows = [{"prompt": conversation, "completion": COMPLETION, "label": i % 2 == 0} for i in range(6)]
    rows += [{"prompt": conversation[-1:], "completion": COMPLETION, "label": i % 2 == 0} for i in range(4)]
    data = Dataset.from_list(rows)
    full = tokenized_row(tokenizer, conversation)
    max_length = len(full["prompt_ids"]) - 4  # the long prompts alone fill max_length
    with caplog.at_level(logging.WARNING):
        kept = KTOExtTrainer(model=small_model, args=cpu_args(tmp_path, max_length=max_length, max_steps=1,
                             truncation_mode="keep_end"), train_dataset=data, processing_class=tokenizer)  # fmt: skip
    assert len(kept.train_dataset) == 10
    assert "truncation_mode='keep_end' shortened the prompt of 6 of 10 rows" in caplog.text
    batch = kept.data_collator([kept.train_dataset[i] for i in range(6)])
    ids, completion = batch["input_ids"][0].tolist(), batch["completion_mask"][0].tolist()
    n = sum(batch["attention_mask"][0].tolist())
    assert ids[:n][-len(full["completion_ids"]) :] == full["completion_ids"]  # the completion whole, at the end
    assert sum(completion) == len(full["completion_ids"])
    kept.train()
    assert "Truncation: `keep_end`" in open(kept.create_model_card()).read()
    dropped = KTOExtTrainer(model=small_model, args=cpu_args(tmp_path, max_length=max_length, max_steps=1),
                            train_dataset=data, processing_class=tokenizer)  # fmt: skip
    assert len(dropped.train_dataset) == 4  # keep_start (the default) drops them, as before
