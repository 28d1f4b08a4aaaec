"""Supported dependency ranges (the one place they are written) and the import-time check of the installed TRL.

`SUPPORTED` holds every run-time requirement exactly as `setup.cfg`'s `install_requires` declares it (a test checks
that the two agree). Each bound is a version the test suite has run with: TRL internals that this package overrides
(`trl.trainer.utils.add_fused_lm_head`, the fused-head step of `KTOTrainer`) differ in every TRL release before 1.16,
so the TRL range is that one tested minor release.

Importing this module runs `require("trl")`: the modules that import TRL internals import it first, so an unsupported
TRL stops with one line naming the supported range instead of an ImportError from deep inside TRL. Only
`importlib.metadata` and `packaging` are used (no heavy import).
"""

from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# distribution name -> version specifier; the same strings as setup.cfg's install_requires.
SUPPORTED: dict[str, str] = {
    "torch": ">=2.13",
    "trl": ">=1.16,<1.17",
    "transformers": ">=5.24",
    "peft": ">=0.21.2",
    "datasets": ">=5.2",
    "accelerate": ">=1.15",
    "bitsandbytes": ">=0.50.2",
    "tensorboard": ">=2.21",
    "matplotlib": ">=3.11.2",
    "pyyaml": ">=6.0.3",
    "packaging": ">=26.2",
    "gguf": ">=0.19",
}


def installed_version(distribution: str) -> str | None:
    """The installed version string of `distribution` (e.g. "1.16.0"), or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirement(distribution: str) -> str:
    """`distribution` with its supported specifier, as pip takes it (e.g. "trl>=1.16,<1.17"). KeyError if unknown."""
    return f"{distribution}{SUPPORTED[distribution]}"


def require(distribution: str) -> None:
    """Raise ImportError (one line: the supported range, the version found, the pip command) unless the installed
    `distribution` lies in its supported range. Local version labels (e.g. torch "2.13.0+cpu") are accepted."""
    found = installed_version(distribution)
    try:
        ok = found is not None and Version(found) in SpecifierSet(SUPPORTED[distribution], prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        wanted = requirement(distribution)
        raise ImportError(
            f"trl-kto-ext needs {wanted} (found {found if found is not None else 'none'}): pip install '{wanted}'"
        )


require("trl")
