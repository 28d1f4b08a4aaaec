"""Run TRL's own KTO test suite (tests/test_kto_trainer.py of the installed TRL release) against KTOExtConfig /
KTOExtTrainer, offline.

    python scripts/trl_suite.py --tests PATH/TO/trl/tests/test_kto_trainer.py [--classes ours|trl|both] [-k EXPR]

The test file is not part of this repository: give it with --tests (or $TRL_KTO_TESTS), e.g. from a checkout of TRL at
the installed version (`git clone --depth 1 --branch v1.16.0 https://github.com/huggingface/trl`). Without it, the
script looks in TRL's source distribution on PyPI (`pip download --no-deps --no-binary :all: trl==VERSION`; the 1.16.0
sdist ships no tests) and then tries that clone itself.

What the script does, in a fresh working folder:
- rewrites `from trl import KTOConfig, KTOTrainer` to our classes under those names (TRL's collators, tested directly
  by the suite, stay TRL's); `--classes trl` runs TRL's own classes instead (the baseline of this harness; bf16
  left off where there is no bf16 GPU, as KTOExtConfig leaves it);
- replaces the Hub: the tiny models the suite loads (`trl-internal-testing/tiny-Qwen2ForCausalLM-2.5`,
  `tiny-RemoteForCausalLM`, `tiny-GptOssForCausalLM`) are built here with random weights and a byte-level tokenizer
  with a ChatML template, and their ids in the test source point to those folders; so does
  `tiny-Qwen2_5_VLForConditionalGeneration`, of which the vision collator tests load only the processor: Qwen2.5-VL's
  image processor and processing (image tokens, `mm_token_type_ids`), the byte-level tokenizer with the vision tokens
  and a multimodal ChatML template, without the video processor (transformers has none without torchvision; the class
  is registered with AutoProcessor in the suite's conftest); `load_dataset` of `trl-internal-testing/zen`, `toolcall`
  and `harmony` returns datasets of the same configurations built here (own text, same columns and splits, streaming
  as `IterableDataset`);
- provides `testing_utils` (TrlTestCase: a `tmp_dir` per test; the `require_*` markers skip when the package is absent);
- runs pytest (one thread, HF_HUB_OFFLINE=1) and prints the counts and every failing test with its first error line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
HUB = "trl-internal-testing"

# Failures that are deliberate differences of KTOExtTrainer from TRL's KTOTrainer: test name -> the difference.
DELIBERATE = {
    "test_evaluate_precompute_ref_log_probs_after_training_raises": "TRL refuses to evaluate a new dataset after "
    "training with precompute_ref_log_probs and no ref_model; KTOExtTrainer computes the right reference log-probs "
    "(the untrained reference kept in host memory, or reloaded from the model's path and checked against its hash)",
    "test_train_model_dtype": "fp16 weights at learning_rate 0.1 diverge at step 4: TRL trains on into NaN weights "
    "(the test passes because NaN differs from the old values); KTOExtTrainer stops with NonFiniteLossError "
    "(on_nonfinite_loss='raise')",
}
# Known open faults of KTOExtTrainer that a test of the suite shows (shown next to the failure while they are open).
OPEN: dict[str, str] = {}
# Failures of TRL's own classes in this environment (`--classes trl`), which KTOExtTrainer passes.
HARNESS = {
    "test_peft_with_quantization": "bitsandbytes 0.50 rounds every 4-bit layer's bias to the fp16 compute dtype in "
    "place at its first forward, so the frozen base changes; KTOExtTrainer keeps the loaded bias",
}

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


# ------------------------------------------------------------------------------------------- testing_utils
# The suite's `from .testing_utils import ...`, written next to it: TrlTestCase gives each test a fresh `self.tmp_dir`;
# the `require_*` markers skip a test when its package is missing (`require_vision`: Pillow, as TRL's).
TESTING_UTILS = """import importlib.util

import pytest


class TrlTestCase:
    @pytest.fixture(autouse=True)
    def _tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)


def _require(module, reason):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=reason)


require_peft = _require("peft", "peft is not installed")
require_bitsandbytes = _require("bitsandbytes", "bitsandbytes is not installed")
require_liger_kernel = _require("liger_kernel", "liger-kernel is not installed")
require_vision = _require("PIL", "Pillow is not installed")
"""


# ------------------------------------------------------------------------------------------------- harness
def find_tests(given: str | None) -> Path:
    """The suite's test file: `given`, $TRL_KTO_TESTS, TRL's sdist on PyPI, or a shallow clone of TRL's tag."""
    import trl

    given = given or os.environ.get("TRL_KTO_TESTS")
    if given:
        if not Path(given).is_file():
            sys.exit(f"trl_suite: {given} does not exist.")
        return Path(given)
    cache = Path(tempfile.gettempdir()) / f"trl-{trl.__version__}-tests"
    found = list(cache.rglob("tests/test_kto_trainer.py")) if cache.exists() else []
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"trl=={trl.__version__}"]
    if subprocess.run([*pip, "-d", str(cache)], capture_output=True).returncode == 0:
        import tarfile

        for archive in cache.glob("trl-*.tar.gz"):
            with tarfile.open(archive) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith("tests/test_kto_trainer.py")), None)
                if member is not None:
                    tar.extract(member, cache, filter="data")
                    return cache / member.name
    url = "https://github.com/huggingface/trl"
    clone = ["git", "clone", "-q", "--depth", "1", "--branch", f"v{trl.__version__}", url, str(cache / "trl")]
    if subprocess.run(clone, capture_output=True).returncode == 0:
        return cache / "trl" / "tests" / "test_kto_trainer.py"
    sys.exit(
        f"trl_suite: TRL {trl.__version__}'s tests/test_kto_trainer.py is not in its PyPI sdist and {url} cannot be "
        "reached: give the file with --tests PATH (from a checkout of TRL at that version)."
    )


def transform(source: str, models: dict[str, str], ours: bool) -> str:
    """The test source with our classes (unless `ours` is False), local model folders and offline datasets."""
    if ours:
        swapped = source.replace(
            "from trl import KTOConfig, KTOTrainer\n",
            "from trl_kto_ext import KTOExtConfig as KTOConfig, KTOExtTrainer as KTOTrainer\n",
        )
        if swapped == source:
            sys.exit(
                "trl_suite: the test file does not import `from trl import KTOConfig, KTOTrainer`: update transform()."
            )
        source = swapped
    source = source.replace("from .testing_utils import", "from testing_utils import")
    source = re.sub(r"^(from datasets import [^\n]*)$", r"\1\nfrom trl_suite import load_dataset", source, count=1,
                    flags=re.M)  # fmt: skip
    for hub_id, folder in models.items():
        source = source.replace(f'"{hub_id}"', repr(folder))
    return source


CONFTEST = """import os
import sys

sys.path.insert(0, {scripts!r})
sys.path.insert(0, {root!r})
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch  # noqa: E402
import trl_suite  # noqa: E402

torch.set_num_threads(1)
trl_suite.register_vlm_processor()  # the class the tiny Qwen2.5-VL processor's processor_config.json names
"""
# For TRL's classes: TRL turns bf16 on whenever it is left unset, which refuses to start on a machine without a bf16
# GPU unless use_cpu is given; there it is left off, as KTOExtConfig leaves it.
TRL_BF16 = """
import trl  # noqa: E402
from transformers.utils import is_torch_bf16_gpu_available  # noqa: E402

_post_init = trl.KTOConfig.__post_init__


def _bf16_where_available(self):
    if self.bf16 is None and not self.fp16:
        self.bf16 = is_torch_bf16_gpu_available()
    _post_init(self)


trl.KTOConfig.__post_init__ = _bf16_where_available
"""


def run(tests: Path, workdir: Path, ours: bool, extra: list[str]) -> Path:
    models = build_models(workdir / "models")
    suite = workdir / ("ours" if ours else "trl")
    suite.mkdir(parents=True, exist_ok=True)
    (suite / "test_kto_trainer.py").write_text(transform(tests.read_text(), models, ours))
    (suite / "testing_utils.py").write_text(TESTING_UTILS)
    conftest = CONFTEST.format(scripts=str(SCRIPTS), root=str(ROOT))
    (suite / "conftest.py").write_text(conftest if ours else conftest + TRL_BF16)
    report = suite / "report.xml"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{SCRIPTS}",
               HF_MODULES_CACHE=str(workdir / "modules"))  # fmt: skip
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir",
               str(suite), f"--junitxml={report}", "-o", "junit_family=xunit1", str(suite), *extra]  # fmt: skip
    subprocess.run(command, cwd=suite, env=env)
    return report


def results(report: Path) -> list[dict]:
    """One entry per test: name, outcome (passed / failed / error / skipped) and the first line of its message."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()[0:1]
                message = message[0] if message else ""
                break
        out.append({"name": f"{case.get('classname').split('.')[-1]}::{case.get('name')}", "outcome": outcome,
                    "message": message[:300]})  # fmt: skip
    return out


def summarize(entries: list[dict], label: str) -> str:
    counts = {k: sum(e["outcome"] == k for e in entries) for k in ("passed", "failed", "error", "skipped")}
    bad = [e["name"].split("::")[-1].split("[")[0] for e in entries if e["outcome"] in ("failed", "error")]
    known = f" ({sum(b in DELIBERATE for b in bad)} deliberate, {sum(b in HARNESS for b in bad)} harness)"
    lines = [f"{label}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + (known if bad else "")]
    for entry in entries:
        if entry["outcome"] in ("failed", "error"):
            base = entry["name"].split("::")[-1].split("[")[0]
            note = f"  [deliberate: {DELIBERATE[base]}]" if base in DELIBERATE else ""
            note = f"  [harness: {HARNESS[base]}]" if base in HARNESS else note
            note = f"  [open: {OPEN[base]}]" if base in OPEN else note
            lines.append(f"  {entry['outcome'].upper()} {entry['name']}: {entry['message']}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", help="TRL's tests/test_kto_trainer.py (else $TRL_KTO_TESTS, PyPI sdist, git clone)")
    parser.add_argument(
        "--classes",
        choices=["ours", "trl", "both"],
        default="ours",
        help="run the suite with our classes, with TRL's own (the harness's baseline), or both",
    )
    parser.add_argument("--workdir", help="working folder (default: a new temporary one)")
    parser.add_argument("--json", help="write the per-test results here")
    parser.add_argument("-k", help="pytest -k expression")
    args = parser.parse_args(argv)
    tests = find_tests(args.tests)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trl-kto-suite-"))
    extra = ["-k", args.k] if args.k else []
    runs = {}
    if args.classes in ("ours", "both"):
        runs["KTOExtTrainer"] = results(run(tests, workdir, True, extra))
    if args.classes in ("trl", "both"):
        runs["trl.KTOTrainer"] = results(run(tests, workdir, False, extra))
    print(f"\nTRL's suite ({tests}) offline, working folder {workdir}")
    for label, entries in runs.items():
        print(summarize(entries, label))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    failed = [e for entries in runs.values() for e in entries if e["outcome"] in ("failed", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
