"""A Hub model id that cannot be loaded stops the CLI at once with one line naming the model and the fix."""

import json
import time

import pytest

from trl_kto_ext.cli import offline as cli

ROWS = [{"prompt": f"{i}+1=", "completion": str(i + 1 + i % 2), "label": i % 2 == 0} for i in range(8)]


def _argv(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return ["--model_name_or_path", "some-org/not-cached-model", "--dataset_name", str(data), "--max_steps", "1",
            "--output_dir", str(tmp_path / "out"), "--eval_strategy", "no", "--report_to", "none"]  # fmt: skip


def test_model_missing_from_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as stop:
        cli.main(_argv(tmp_path))
    message = str(stop.value)
    assert message.startswith("trl-kto-ext: error: could not load the model 'some-org/not-cached-model': ")
    assert "With HF_HUB_OFFLINE=1 only models already in the local Hub cache load" in message
    assert "\n" not in message


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        cli.main(_argv(tmp_path))
    elapsed = time.perf_counter() - start
    message = str(stop.value)
    assert "could not load the model 'some-org/not-cached-model': it is not a local folder and the Hub cannot be" in (
        message
    )
    assert "\n" not in message
    print(f"failed after {elapsed:.1f} s")  # reported, not asserted (no timed assertions)
