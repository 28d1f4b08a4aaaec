"""The Python blocks of README.md and docs/*.md run as written, offline: each file's blocks in order, in one folder."""

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
    assert found >= 3  # Quickstart, LoRA, QLoRA in the README


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
        assert sum("loss" in entry for entry in logged) == 5  # logging_steps=1: a curve, not an empty figure
    if path.name in ("README.md", "lora.md"):
        assert (tmp_path / "kto-lora" / "adapter_config.json").is_file()
        assert (tmp_path / "kto-qlora" / "adapter_config.json").is_file()
        assert (tmp_path / "kto-merged" / "config.json").is_file()
        assert not (tmp_path / "kto-merged" / "adapter_config.json").exists()  # merged: a plain model
