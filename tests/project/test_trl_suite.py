"""scripts/trl_suite.py, the offline harness that runs TRL's KTO test suite against our classes: the class swap, the
datasets and models it builds in place of the Hub, and the chat template's prefix property TRL's tokenization needs."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from datasets import IterableDataset

# Loaded from its file, so that scripts/ does not join sys.path for the other tests.
_SPEC = importlib.util.spec_from_file_location(
    "trl_suite", Path(__file__).resolve().parents[2] / "scripts" / "trl_suite.py"
)
trl_suite = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(trl_suite)

SOURCE = """from datasets import Dataset, load_dataset
from trl import KTOConfig, KTOTrainer
from .testing_utils import TrlTestCase

MODEL = "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5"
DATA = load_dataset("trl-internal-testing/zen", "standard_unpaired_preference")
"""


def test_transform_swaps_classes_models_and_datasets():
    models = {"trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": "/models/qwen"}
    ours = trl_suite.transform(SOURCE, models, ours=True)
    assert "from trl_kto_ext import KTOExtConfig as KTOConfig, KTOExtTrainer as KTOTrainer\n" in ours
    assert "from trl import KTOConfig" not in ours
    assert "from datasets import Dataset, load_dataset\nfrom trl_suite import load_dataset\n" in ours
    assert "from testing_utils import TrlTestCase" in ours
    assert "MODEL = '/models/qwen'" in ours and '"trl-internal-testing/zen"' in ours  # datasets keep their ids
    assert "from trl import KTOConfig, KTOTrainer" in trl_suite.transform(SOURCE, models, ours=False)


def test_datasets_have_the_configs_splits_and_labels_of_the_suite():
    data = trl_suite.load_dataset("trl-internal-testing/zen", "standard_unpaired_preference")
    assert (len(data["train"]), len(data["test"])) == (17, 2)
    assert set(data["train"]["label"]) == {True, False} and set(data["test"]["label"]) == {True, False}
    stream = trl_suite.load_dataset(
        "trl-internal-testing/zen", "conversational_preference", split="test", streaming=True
    )
    assert isinstance(stream, IterableDataset) and len(list(stream)) == 2
    implicit = trl_suite.load_dataset(
        "trl-internal-testing/zen", "conversational_implicit_prompt_preference", split="train"
    )
    assert implicit.column_names == ["chosen", "rejected"]
    with pytest.raises(FileNotFoundError, match="not one of the datasets"):
        trl_suite.load_dataset("trl-internal-testing/zen-image", "conversational_unpaired_preference")


@pytest.mark.parametrize(("path", "name"), [("trl-internal-testing/toolcall", "preference"),
                                            ("trl-internal-testing/harmony", "preference")])  # fmt: skip
def test_chat_template_prompt_is_a_prefix_of_the_conversation(path, name):
    tokenizer = trl_suite.build_tokenizer()
    for row in trl_suite.load_dataset(path, name, split="train").select(range(3)):
        tools = json.loads(row["tools"]) if "tools" in row else None
        prompt = tokenizer.apply_chat_template(row["prompt"], tools=tools, add_generation_prompt=True, tokenize=False)
        for completion in (row["chosen"], row["rejected"]):
            full = tokenizer.apply_chat_template(row["prompt"] + completion, tools=tools, tokenize=False)
            assert full.startswith(prompt) and full.endswith("<|im_end|>\n") and len(full) > len(prompt)
    ids = tokenizer("Clear code reads like a letter.")["input_ids"]
    assert tokenizer.decode(ids) == "Clear code reads like a letter." and len(ids) == 31  # one token per byte


def test_models_build_and_the_remote_one_needs_trust(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = trl_suite.build_models(tmp_path)
    assert set(paths) == {f"trl-internal-testing/{name}" for name in trl_suite.MODELS}
    with pytest.raises(ValueError, match="custom code"):
        AutoModelForCausalLM.from_pretrained(paths["trl-internal-testing/tiny-RemoteForCausalLM"])
    remote = AutoModelForCausalLM.from_pretrained(paths["trl-internal-testing/tiny-RemoteForCausalLM"],
                                                  trust_remote_code=True)  # fmt: skip
    assert type(remote).__name__ == "RemoteForCausalLM"
    gpt_oss = AutoModelForCausalLM.from_pretrained(paths["trl-internal-testing/tiny-GptOssForCausalLM"])
    assert gpt_oss.config.num_local_experts == 4 and gpt_oss.config.output_router_logits is False


def test_vlm_processor_loads_offline_and_marks_its_image_tokens(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    path = trl_suite.build_models(tmp_path)["trl-internal-testing/tiny-Qwen2_5_VLForConditionalGeneration"]
    trl_suite.register_vlm_processor()  # what the suite's conftest does
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == "ImageOnlyQwen2_5_VLProcessor" and processor.image_token == "<|image_pad|>"
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]
    text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(prompt + completion, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    assert full == text + "A red square.<|im_end|>\n"
    out = processor(images=[Image.new("RGB", (16, 16))], text=[text], return_tensors="pt")
    # 16 x 16 pixels are resized to 56 x 56: 4 x 4 patches of 14, merged 2 x 2 -> 4 image tokens.
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]] and tuple(out["pixel_values"].shape) == (16, 3 * 2 * 14 * 14)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (out["input_ids"] == image_id).sum() == 4
    assert out["mm_token_type_ids"].tolist() == (out["input_ids"] == image_id).long().tolist()
    # Byte-level: one token per byte of plain text, one per special token, the image pad expanded to 4.
    specials = re.findall(r"<\|[a-z_]+\|>", text)
    plain = re.sub(r"<\|[a-z_]+\|>", "", text)
    assert out["input_ids"].shape[1] == len(plain.encode()) + len(specials) + 3
