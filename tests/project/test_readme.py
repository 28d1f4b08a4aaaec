"""README.md and docs/*.md are current: their Python blocks run as written, offline (each file's blocks in order, in one
folder); the README stays short; every link, module path and file path they name exists."""

import glob
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HUB_MARK = "<!-- hub -->"
HUB_LINE = "# needs the Hugging Face Hub"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# Runs the blocks one after another, each with fresh globals (a block may only use what it defines, and files that
# an earlier block wrote, as a reader following the page would have them).
RUNNER = """
import json, sys, time
for i, code in enumerate(json.load(open(sys.argv[1]))):
    start = time.perf_counter()
    exec(compile(code, f"block {i + 1}", "exec"), {"__name__": "__main__"})
    print(f"block {i + 1}: {time.perf_counter() - start:.1f} s", flush=True)
"""


def python_blocks(path: Path) -> list[tuple[str, bool]]:
    """(code, needs_hub) of every ```python block of a Markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        marked = bool(before) and before[-1].strip() == HUB_MARK
        code = match.group(1)
        says_hub = code.lstrip().startswith(HUB_LINE)
        assert marked == says_hub, f"{path.name}: a block with {HUB_MARK} must start with '{HUB_LINE}' and back"
        blocks.append((code, marked))
    return blocks


def test_every_hub_block_has_an_offline_twin():
    found = 0
    for path in DOCS:
        blocks = python_blocks(path)
        for i, (_, hub) in enumerate(blocks):
            if hub:
                found += 1
                neighbours = [blocks[j][1] for j in (i - 1, i + 1) if 0 <= j < len(blocks)]
                assert False in neighbours, f"{path.name}: hub block {i + 1} has no offline block next to it"
    assert found >= 4  # README Quickstart; LoRA and QLoRA in docs/lora.md; online in docs/online.md


@pytest.mark.parametrize(
    "path", [p for p in DOCS if any(not hub for _, hub in python_blocks(p))], ids=lambda p: p.name
)
def test_python_blocks_run_offline(path, tiny_default, tmp_path):
    blocks = [code for code, hub in python_blocks(path) if not hub]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env["TRL_KTO_EXT_CACHE"] = str(Path(tiny_default.model_dir).parent)  # the tiny model the session already built
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, "blocks.json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{path.name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result.stdout.count("s\n") >= len(blocks)
    if path.name == "README.md":  # what the blocks say they write
        assert (tmp_path / "kto-quickstart" / "model.safetensors").is_file()
        card = (tmp_path / "kto-quickstart" / "README.md").read_text()
        assert "`tiny-arithmetic`" in card and "λ_D = 1, λ_U = 1" in card  # load_tiny's data is balanced
        assert (tmp_path / "kto-quickstart" / "training_curves.png").is_file()
        assert "Curves: `training_curves.png` in this folder" in card  # named only because the block drew them
        logged = json.loads((tmp_path / "kto-quickstart" / "trainer_state.json").read_text())["log_history"]
        assert sum("loss" in entry for entry in logged) == 5  # 50 steps, logging_steps=10: a curve, not one point
        check_quickstart_output(result.stdout)
        assert (tmp_path / "kto-lora" / "adapter_config.json").is_file()  # the LoRA block: an adapter, no weights
        assert not (tmp_path / "kto-lora" / "model.safetensors").exists()
    if path.name == "lora.md":
        assert (tmp_path / "kto-lora" / "adapter_config.json").is_file()
        assert (tmp_path / "kto-qlora" / "adapter_config.json").is_file()
        assert (tmp_path / "kto-merged" / "config.json").is_file()
        assert not (tmp_path / "kto-merged" / "adapter_config.json").exists()  # merged: a plain model


QUICKSTART_LINE = re.compile(
    r"^held-out accuracy (before|after): +([\d.]+)$|^step +(\d+): loss ([\d.]+), rewards/margins ([+-][\d.]+)$", re.M
)


def _quickstart_figures(text: str) -> dict[str, float]:
    """{"before": acc, "after": acc, "loss 10": ..., "margin 10": ..., ...} from the quickstart's printed lines."""
    figures = {}
    for accuracy, value, step, loss, margin in QUICKSTART_LINE.findall(text):
        if accuracy:
            figures[accuracy] = float(value)
        else:
            figures[f"loss {step}"], figures[f"margin {step}"] = float(loss), float(margin)
    return figures


def check_quickstart_output(stdout: str) -> None:
    """The quickstart visibly learns, and prints what the README says it prints (to run-to-run noise)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^It prints.*?\n```\n(.*?)^```", text, re.S | re.M).group(1)
    shown, printed = _quickstart_figures(block), _quickstart_figures(stdout)
    assert len(shown) == 12 and shown.keys() == printed.keys(), (shown, printed)
    for line in block.splitlines():  # the other lines (λ, max_length) exactly as shown
        assert QUICKSTART_LINE.match(line) or line in stdout.splitlines(), f"the quickstart did not print {line!r}"
    # What a reader should see change: accuracy up, loss below 0.5, the reward margin grown.
    assert printed["after"] >= printed["before"] + 0.15, printed
    assert printed["loss 50"] <= 0.495 and printed["margin 50"] >= 0.05, printed
    for key, value in shown.items():
        tolerance = 0.03 if key in ("before", "after") else 0.003 if key.startswith("loss") else 0.02
        assert abs(printed[key] - value) <= tolerance, (
            f"README shows {key} = {value}, the block printed {printed[key]}"
        )


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 320, f"README.md has {lines} lines: move detail into docs/ and link it (limit 320)"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    headings = re.findall(r"^#+ +(.+?) *$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.is_file():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


REFERENCED = [*DOCS, *sorted((ROOT / "configs").rglob("*.yaml")), *sorted((ROOT / "notebooks").glob("*.ipynb"))]
DOTTED = re.compile(r"\btrl_kto_ext(?:\.[A-Za-z_]\w*)+")
# A file path the text names, optionally with a pytest node (`tests/x/test_y.py::test_z`).
FILE_PATH = re.compile(
    r"(?<![\w/.-])((?:trl_kto_ext|tests|scripts|configs|docs|results|notebooks)/[\w./*-]*\w)(?:::(\w+))?"
)


def _resolves(dotted: str) -> bool:
    """True when `dotted` is a module, or a module followed by attributes that exist (import + getattr)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("path", REFERENCED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_module_object_and_file_exists(path):
    text = path.read_text(encoding="utf-8")
    missing = [name for name in sorted(set(DOTTED.findall(text))) if not _resolves(name)]
    for file, test in sorted(set(FILE_PATH.findall(text))):
        found = glob.glob(str(ROOT / file)) if "*" in file else [str(ROOT / file)] * (ROOT / file).exists()
        if not found:
            missing.append(file)
        elif test and not re.search(rf"^def {test}\(", Path(found[0]).read_text(encoding="utf-8"), re.M):
            missing.append(f"{file}::{test}")
    assert not missing, f"{path.relative_to(ROOT)} names what does not exist: {missing}"
