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
- replaces the Hub (scripts/trl_suite_hub.py): the tiny models the suite loads (`trl-internal-testing/tiny-Qwen2ForCausalLM-2.5`,
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
sys.path.insert(0, str(SCRIPTS))  # its Hub stand-ins, also when loaded by path (the tests)

from trl_suite_hub import HUB, MODELS, build_models, build_tokenizer, load_dataset, register_vlm_processor  # noqa: E402, F401

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
