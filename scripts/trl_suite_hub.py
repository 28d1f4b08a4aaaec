"""The offline stand-ins for what TRL's KTO test suite loads from the Hub (`trl-internal-testing/...`), for
scripts/trl_suite.py: a byte-level ChatML tokenizer, tiny random-weight models (Qwen2, a remote-code model, GPT-OSS), a
tiny Qwen2.5-VL processor, and datasets of the suite's configurations built here (own text, same columns and splits)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

HUB = "trl-internal-testing"


# ------------------------------------------------------------------------------------------------ tokenizer
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML with tools, tool calls, tool results and an optional `thinking` field; the prompt with
# add_generation_prompt=True is a prefix of the prompt followed by an assistant turn.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}"
    "{% else %}<|im_start|>system\nYou are a helpful assistant.{% endif %}"
    "{% if tools %}{{ '\\n# Tools' }}{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}"
    "{% elif message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if message.get('thinking') %}<think>{{ message['thinking'] }}</think>{% endif %}"
    "{{ message.get('content') or '' }}"
    "{% for call in message.get('tool_calls') or [] %}<tool_call>{{ call['function'] | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(extra_special_tokens: tuple[str, ...] = ()):
    """A byte-level tokenizer (every byte one token, no merges) with ChatML special tokens: it encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *extra_special_tokens]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------------- models
def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _qwen2_config(vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )


def build_qwen2(folder: Path, tokenizer) -> None:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    _save(Qwen2ForCausalLM(_qwen2_config(len(tokenizer))), tokenizer, folder)


REMOTE_CONFIG = """from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote"
"""
REMOTE_MODELING = """from transformers import Qwen2ForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
"""


def build_remote(folder: Path, tokenizer) -> None:
    """A model whose classes live in the folder (`auto_map`): loading it needs trust_remote_code=True."""
    build_qwen2(folder, tokenizer)
    (folder / "configuration_remote.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_remote.py").write_text(REMOTE_MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="remote",
        architectures=["RemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def build_gpt_oss(folder: Path, tokenizer) -> None:
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=131072,  # 32 x 4096: the YaRN factor of GptOss's default rope parameters
        tie_word_embeddings=False,
    )
    _save(GptOssForCausalLM(config), tokenizer, folder)


# ------------------------------------------------------------------------------------- vision-language processor
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# The ChatML template above for Qwen2.5-VL's message form: a content is a string or a list of {"type": "image" /
# "video" / "text"} parts (TRL's prepare_multimodal_messages); an image part is one <|image_pad|>, which the processor
# expands to the image's token count.
VLM_CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
    "{% if messages[0]['role'] == 'system' %}<|im_start|>system\n{{ render(messages[0]['content']) }}<|im_end|>\n"
    "{% else %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if not (message['role'] == 'system' and loop.first) %}"
    "<|im_start|>{{ message['role'] }}\n{{ render(message['content']) }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VLM_PROCESSOR = "ImageOnlyQwen2_5_VLProcessor"


@functools.cache
def register_vlm_processor() -> type:
    """Registers with AutoProcessor (once per process) Qwen2.5-VL's processor without its video part; returns it.

    `Qwen2_5_VLProcessor` always loads a video processor, and transformers offers none without torchvision, which this
    CPU environment lacks (PyPI's torchvision wheels link CUDA torch). The suite's vision tests give images only: this
    subclass keeps Qwen2.5-VL's image and text processing (image tokens, `mm_token_type_ids`) and drops the video
    processor from `__init__`, the list `from_pretrained` loads. The suite's conftest registers it, so that
    `AutoProcessor.from_pretrained` finds the class the saved `processor_config.json` names."""
    from transformers import AutoProcessor, PreTrainedConfig, Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class VlmProcessorConfig(PreTrainedConfig):
        model_type = "trl-suite-image-only-qwen2_5_vl"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Qwen2_5_VLProcessor.__init__ less the video processor: image/video tokens and their ids from the tokenizer.
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    processor = type(VLM_PROCESSOR, (Qwen2_5_VLProcessor,), {"__init__": __init__})
    AutoProcessor.register(VlmProcessorConfig, processor, exist_ok=True)
    return processor


def build_vlm_processor(folder: Path, tokenizer=None) -> None:
    """Qwen2.5-VL's processor (image part, see [`register_vlm_processor`]): its image processor (any image becomes
    56 x 56 pixels: 4 x 4 patches of 14, merged 2 x 2 into 4 image tokens), the byte-level tokenizer with the vision
    tokens and the multimodal ChatML template. Saved with save_pretrained; no model (the suite loads none).
    `tokenizer` (the text models' one) is not used: this one has the vision tokens besides."""
    from transformers import Qwen2VLImageProcessorPil

    side = 56
    image_processor = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)  # fmt: skip
    vlm_tokenizer = build_tokenizer(VISION_TOKENS)
    register_vlm_processor()(image_processor, vlm_tokenizer, chat_template=VLM_CHAT_TEMPLATE).save_pretrained(folder)


MODELS = {
    "tiny-Qwen2ForCausalLM-2.5": build_qwen2,
    "tiny-RemoteForCausalLM": build_remote,
    "tiny-GptOssForCausalLM": build_gpt_oss,
    "tiny-Qwen2_5_VLForConditionalGeneration": build_vlm_processor,
}


def build_models(folder: Path) -> dict[str, str]:
    """Builds every model of [`MODELS`] under `folder` (once); returns {hub id: local folder}."""
    tokenizer = build_tokenizer()
    paths = {}
    for name, build in MODELS.items():
        target = folder / name
        if not ((target / "config.json").is_file() or (target / "processor_config.json").is_file()):
            target.mkdir(parents=True, exist_ok=True)
            build(target, tokenizer)
        paths[f"{HUB}/{name}"] = str(target)
    return paths


# ------------------------------------------------------------------------------------------------- datasets
# Our own short sayings (prompt, a good continuation, a poor one); 19 rows: 17 train, 2 test, as TRL's zen set.
SAYINGS = [
    ("Clear code", " reads like a letter.", " reads like a riddle."),
    ("A test that cannot fail", " proves nothing.", " proves everything."),
    ("Small functions", " are easy to name.", " are never needed."),
    ("Errors should", " say what went wrong.", " stay quiet."),
    ("Measure", " before you optimise.", " after you ship."),
    ("One obvious way", " beats three clever ones.", " is boring."),
    ("Names matter:", " they carry the meaning.", " nobody reads them."),
    ("Flat structure", " is easier to follow.", " hides nothing useful."),
    ("Comments explain", " why, not what.", " every single line."),
    ("Defaults should", " be safe.", " be surprising."),
    ("A bug found early", " is cheap.", " can wait."),
    ("Simple data", " makes simple code.", " is for beginners."),
    ("Write the test", " before the fix.", " if time allows."),
    ("Logs are", " for the reader.", " for the disk."),
    ("Special cases", " are not special enough.", " deserve their own rules."),
    ("Guessing", " is worse than asking.", " saves time."),
    ("Readable beats", " clever.", " correct."),
    ("Good tools", " disappear in use.", " need a manual."),
    ("Finish", " what you start.", " nothing twice."),
]


def _zen(config: str) -> dict[str, list]:
    rows: dict[str, list] = {}
    for i, (prompt, good, bad) in enumerate(SAYINGS):
        label = i % 3 != 2  # both labels in every split
        user = [{"role": "user", "content": prompt}]
        row = {
            "standard_preference": {"prompt": prompt, "chosen": good, "rejected": bad},
            "standard_unpaired_preference": {"prompt": prompt, "completion": good if label else bad, "label": label},
            "conversational_preference": {
                "prompt": user,
                "chosen": [{"role": "assistant", "content": good.strip()}],
                "rejected": [{"role": "assistant", "content": bad.strip()}],
            },
            "conversational_implicit_prompt_preference": {
                "chosen": [*user, {"role": "assistant", "content": good.strip()}],
                "rejected": [*user, {"role": "assistant", "content": bad.strip()}],
            },
            "conversational_unpaired_preference": {
                "prompt": user,
                "completion": [{"role": "assistant", "content": (good if label else bad).strip()}],
                "label": label,
            },
        }[config]
        for key, value in row.items():
            rows.setdefault(key, []).append(value)
    return rows


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _toolcall() -> dict[str, list]:
    cities = ["Paris", "Lima", "Oslo", "Cairo", "Perth", "Quito", "Rome", "Seoul", "Tunis", "Hanoi"] * 2
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "tools": []}
    for city in cities[:19]:
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        rows["prompt"].append([{"role": "user", "content": f"What is the weather in {city}?"}])
        rows["chosen"].append([{"role": "assistant", "content": "", "tool_calls": [call]}])
        rows["rejected"].append([{"role": "assistant", "content": f"It is always sunny in {city}."}])
        rows["tools"].append(json.dumps([WEATHER_TOOL]))
    return rows


def _harmony() -> dict[str, list]:
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for prompt, good, bad in SAYINGS:
        rows["prompt"].append([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}])
        rows["chosen"].append([{"role": "assistant", "thinking": "Complete it.", "content": good.strip()}])
        rows["rejected"].append([{"role": "assistant", "thinking": "Anything.", "content": bad.strip()}])
    return rows


DATASETS = {
    (f"{HUB}/zen", config): (lambda config=config: _zen(config))
    for config in (
        "standard_preference",
        "standard_unpaired_preference",
        "conversational_preference",
        "conversational_implicit_prompt_preference",
        "conversational_unpaired_preference",
    )
}
DATASETS[(f"{HUB}/toolcall", "preference")] = _toolcall
DATASETS[(f"{HUB}/harmony", "preference")] = _harmony


def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    """`datasets.load_dataset` for the suite's Hub datasets, built here: train (17 rows) and test (2 rows) splits."""
    from datasets import Dataset, DatasetDict, IterableDatasetDict

    if (path, name) not in DATASETS:
        raise FileNotFoundError(f"{path!r} ({name}) is not one of the datasets this harness builds offline.")
    full = Dataset.from_dict(DATASETS[(path, name)]())
    splits = {"train": full.select(range(17)), "test": full.select(range(17, 19))}
    if streaming:
        splits = {k: v.to_iterable_dataset() for k, v in splits.items()}
    if split is not None:
        return splits[split]
    return IterableDatasetDict(splits) if streaming else DatasetDict(splits)
