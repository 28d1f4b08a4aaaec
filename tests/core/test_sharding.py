"""FSDP asked for where accelerate cannot set it up (CPU) stops with a message instead of training unsharded (DDP)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def test_fsdp_on_cpu_is_refused_not_silently_ddp(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "message.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    worker = Path(__file__).parents[1] / "fsdp_worker.py"
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", str(worker), str(out)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    message = out.read_text()
    assert "did not enable FSDP on device 'cpu'" in message, message
    assert "plain data parallelism with unsharded weights" in message
