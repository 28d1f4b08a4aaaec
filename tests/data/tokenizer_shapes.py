"""Tokenizers of the shapes users bring, built in code over the tiny model's character vocabulary (no Hub).

Every builder returns a `PreTrainedTokenizerFast` whose ids are those of `trl_kto_ext.models.tiny.build_tokenizer`
(so the tiny model can run them): <pad>=0, <s>=1, </s>=2, <unk>=3, <|system|>=4, <|user|>=5, <|assistant|>=6, then
one id per character; `<|im_start|>` / `<|im_end|>` are added after the alphabet where a ChatML template needs them.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from trl_kto_ext.models.tiny import ALPHABET, BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, UNK

VOCAB = [PAD, BOS, EOS, UNK, *ROLE_TOKENS, *ALPHABET]
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def token_id(token: str) -> int:
    """The id of `token` (a special token or one character) in every tokenizer built here."""
    return [*VOCAB, IM_START, IM_END].index(token)


def ids(text: str) -> list[int]:
    """Character ids of `text` (no special tokens)."""
    return [token_id(c) for c in text]


def build(*, single: str | None = "<s> $A", eos: str | None = EOS, chat_template: str | None = CHAT_TEMPLATE,
          chatml: bool = False) -> PreTrainedTokenizerFast:  # fmt: skip
    """A character tokenizer whose post-processor adds `single` around a text (None: nothing added), with EOS token
    `eos` (None: no EOS token), pad token <pad> and the given chat template."""
    vocab = [*VOCAB, IM_START, IM_END] if chatml else VOCAB
    backend = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(vocab)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if single is not None:
        used = [tok for tok in (BOS, EOS) if tok in single.split()]
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B", special_tokens=[(tok, vocab.index(tok)) for tok in used]
        )
    special = list(ROLE_TOKENS) + ([IM_START, IM_END] if chatml else [])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=eos,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=special,
        chat_template=chat_template,
        model_input_names=["input_ids", "attention_mask"],
    )


def adds_nothing():
    """Like GPT-2 or Qwen: nothing added to a text."""
    return build(single=None)


def appends_eos():
    """A post-processor `<s> $A </s>`, as `add_eos_token=True` on a Llama tokenizer."""
    return build(single="<s> $A </s>")


def without_eos():
    """No EOS token at all (a pad token is set)."""
    return build(eos=None, chat_template=CHATML_TEMPLATE, chatml=True)


def chatml():
    """A ChatML template whose end of turn `<|im_end|>` is not the EOS token `</s>`; nothing added to a text."""
    return build(single=None, chat_template=CHATML_TEMPLATE, chatml=True)
