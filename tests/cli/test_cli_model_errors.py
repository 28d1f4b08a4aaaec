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


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("smollm2-135m-instrct", "Did you mean `smollm2-135m-instruct` (an embedded model)?"),
        ("Tinyy", "Did you mean `tiny` (an embedded model)?"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "--model_name_or_path smollm2-135m-instruct."),
        ("some-org/not-cached-model", None),
    ],
)
@pytest.mark.parametrize("offline", [True, False])
def test_a_name_close_to_an_embedded_model_is_suggested(tmp_path, monkeypatch, name, hint, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    argv = _argv(tmp_path)
    argv[1] = name
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    message = str(stop.value)
    assert message.startswith(f"trl-kto-ext: error: could not load the model {name!r}: ") and "\n" not in message
    assert (hint in message) if hint else ("Did you mean" not in message and "built in" not in message)


def test_a_dataset_name_close_to_the_embedded_one_is_suggested(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    argv = _argv(tmp_path)
    argv[1], argv[3] = "tiny", "tiny-arithmetc"
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert "Did you mean `tiny-arithmetic` (the embedded dataset)?" in str(stop.value)
