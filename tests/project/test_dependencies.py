"""Declared dependencies: every run-time need of the package, the CLI and the shipped configs is a core dependency,
setup.cfg and `trl_kto_ext.compat` declare the same ranges, the tested versions lie in them, and an unsupported TRL
stops with one line naming the supported range."""

import ast
import configparser
import importlib.metadata
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from trl_kto_ext import compat

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

# `report_to` value -> the distribution transformers' callback for it imports (TensorBoardCallback needs the
# `tensorboard` package for torch.utils.tensorboard, and so on).
INTEGRATION_PACKAGE = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "neptune": "neptune",
    "clearml": "clearml",
    "codecarbon": "codecarbon",
    "dagshub": "dagshub",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
    "azure_ml": "azureml-core",
    "flyte": "flytekit",
    "kubeflow": "kubeflow",
}

# Needs deliberately left to the user, each stated in the header of the config that has it: DeepSpeed is built
# against the user's CUDA toolchain and is only used through `accelerate launch`.
USER_INSTALLED = {"deepspeed": "pip install deepspeed"}


def install_requires() -> dict[str, SpecifierSet]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in parser["options"]["install_requires"].splitlines() if line.strip()]
    requirements = [Requirement(line) for line in lines]
    return {canonicalize_name(req.name): req.specifier for req in requirements}


def config_needs(config: dict) -> set[str]:
    """Distributions a config needs at run time, from its keys (report_to, optimizer, quantization, launcher)."""
    needs = set()
    report_to = config.get("report_to", [])
    for name in [report_to] if isinstance(report_to, str) else report_to:
        if name == "none":
            continue
        assert name in INTEGRATION_PACKAGE, f"report_to: {name}: add its package to INTEGRATION_PACKAGE"
        needs.add(INTEGRATION_PACKAGE[name])
    if config.get("load_in_4bit") or config.get("load_in_8bit") or "8bit" in str(config.get("optim", "")):
        needs.add("bitsandbytes")
    if config.get("use_peft"):
        needs.add("peft")
    if config.get("use_liger_kernel"):
        needs.add("liger-kernel")
    if str(config.get("attn_implementation", "")).startswith("flash_attention"):
        needs.add("flash-attn")
    if config.get("deepspeed") or config.get("distributed_type") == "DEEPSPEED":
        needs.add("deepspeed")
    if "model_name_or_path" in config or "dataset_name" in config:
        needs.update({"torch", "trl", "transformers", "datasets", "accelerate", "pyyaml", "matplotlib"})
    return {canonicalize_name(need) for need in needs}


def test_integration_table_covers_transformers():
    assert set(INTEGRATION_TO_CALLBACK) <= set(INTEGRATION_PACKAGE), set(INTEGRATION_TO_CALLBACK) - set(
        INTEGRATION_PACKAGE
    )


def test_tiny_config_needs_tensorboard():
    # The README command 1 config: the need that once was only in the [dev] extra.
    config = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    assert config["report_to"] == "tensorboard"
    assert "tensorboard" in config_needs(config)
    assert "tensorboard" in install_requires()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_needs_are_core_dependencies(path):
    text = path.read_text()
    core = install_requires()
    for need in sorted(config_needs(yaml.safe_load(text))):
        if need in USER_INSTALLED:
            assert USER_INSTALLED[need] in text, f"{path.name} needs {need}: say `{USER_INSTALLED[need]}` in it"
            continue
        assert need in core, f"{path.name} needs {need} at run time: add it to setup.cfg install_requires"


def dependency_closure(names) -> set[str]:
    """The installed distributions `names` pull in (run-time requirements only, no extras), names canonical."""
    seen, todo = set(), [canonicalize_name(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def imported_top_modules(paths) -> set[str]:
    """Top-level names of every absolute import (module level or inside functions) in the given files."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_import_of_the_package_and_scripts_is_installed_by_install_requires():
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    local = {"trl_kto_ext", "__future__"} | {path.stem for path in scripts}
    modules = imported_top_modules(sorted((ROOT / "trl_kto_ext").rglob("*.py")) + scripts)
    modules -= local | set(sys.stdlib_module_names)
    closure = dependency_closure(install_requires())
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(modules):
        distributions = {canonicalize_name(d) for d in providers.get(module, [])}
        if not distributions & closure:
            missing[module] = sorted(distributions) or "not installed"
    assert not missing, f"imported but not installed by install_requires: {missing}"


def test_setup_cfg_and_compat_declare_the_same_ranges():
    assert install_requires() == {
        canonicalize_name(name): SpecifierSet(spec) for name, spec in compat.SUPPORTED.items()
    }


def test_the_versions_tested_here_lie_in_the_declared_ranges():
    for distribution in compat.SUPPORTED:
        compat.require(distribution)  # raises ImportError naming the range otherwise


@pytest.mark.parametrize("found", ["1.12.0", "1.15.0", "1.17.0", "1.17.0rc1", "2.0.0", None])
def test_unsupported_trl_stops_with_one_line(monkeypatch, found):
    monkeypatch.setattr(compat, "installed_version", lambda distribution: found)
    with pytest.raises(ImportError) as caught:
        compat.require("trl")
    shown = "none" if found is None else found
    assert str(caught.value) == f"trl-kto-ext needs trl>=1.16,<1.17 (found {shown}): pip install 'trl>=1.16,<1.17'"


@pytest.mark.parametrize("found", ["1.16.0", "1.16.3", "1.16.1.post1"])
def test_supported_trl_passes(monkeypatch, found):
    monkeypatch.setattr(compat, "installed_version", lambda distribution: found)
    compat.require("trl")


def test_local_version_labels_are_accepted(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda distribution: "2.13.0+cpu")
    compat.require("torch")


def test_modules_importing_trl_check_its_version_first():
    # Whole kind: any module that imports TRL at module level imports `compat` before anything else.
    for path in sorted((ROOT / "trl_kto_ext").rglob("*.py")):
        body = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        body = [node for node in body if not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
        uses_trl = any(
            (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "trl")
            or (isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "trl" for alias in node.names))
            for node in body
        )
        if uses_trl:
            first = body[0]
            assert (
                isinstance(first, ast.ImportFrom) and first.module == "trl_kto_ext" and first.names[0].name == "compat"
            ), f"{path.name}: first import must be `from trl_kto_ext import compat` (it refuses an unsupported TRL)"
