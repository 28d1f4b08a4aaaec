"""The tree reads as the architecture: no import cycle, one seam to TRL's internals, modules of one idea each."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import transformers
import trl

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "trl_kto_ext"
SEAM = PACKAGE / "trl_internals.py"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Package modules imported anywhere in `path` (module level or inside functions), by their dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path.name}: relative import (the package uses absolute imports)"
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(MODULES)
            found |= submodules or {node.module}  # `from pkg import module` depends on the module
    # The package's own __init__ resolves its public names lazily and is imported by nothing for a helper.
    return {name for name in found if name in MODULES and name != "trl_kto_ext"}


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items() if name != "trl_kto_ext"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path of nodes, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def unit(name: str) -> str:
    """A module's place in the architecture: its subpackage (trl_kto_ext.data, ...), or itself for a core module."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else name


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    assert find_cycle(GRAPH) is None


def test_no_import_cycle_between_subpackages():
    # A subpackage reaching up into the core (or into another subpackage) that reaches back down is a cycle here.
    units: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        units.setdefault(unit(name), set()).update(unit(t) for t in targets if unit(t) != unit(name))
    assert find_cycle(units) is None


def test_modules_are_short_and_say_what_they_are_for():
    for name, path in MODULES.items():
        lines = path.read_text().count("\n")
        assert lines <= MAX_LINES, f"{name} has {lines} lines (split it by idea: at most {MAX_LINES})"
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{name} has no one-line purpose (module docstring)"


def test_test_modules_have_distinct_names():
    # Test folders have no __init__.py: two test files of one name would collide at collection.
    names = [path.name for path in (ROOT / "tests").rglob("*.py")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_research_code_is_not_installed():
    assert not (PACKAGE / "reproduction.py").exists()
    assert (ROOT / "scripts" / "reproduction.py").is_file()


# --- the TRL seam -------------------------------------------------------------------------------------------------
def _trl_imports(path: Path) -> list[str]:
    """Each import of TRL in `path` that is not a public top-level name: `trl.x` modules and `_private` names."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            bad += [alias.name for alias in node.names if alias.name.startswith("trl.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trl":
            if node.module != "trl":
                bad.append(node.module)
            bad += [f"trl.{alias.name}" for alias in node.names if alias.name.startswith("_")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("trl."):
            bad.append(node.value)  # a module path by name (a logger, importlib)
    return bad


def test_trl_internals_are_used_only_through_the_seam():
    for name, path in MODULES.items():
        if path != SEAM:
            assert not _trl_imports(path), (
                f"{name} uses TRL internals {_trl_imports(path)}: add them to trl_internals.py"
            )


def test_the_seam_check_catches_an_internal_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from trl.trainer.utils import use_adapter\nfrom trl import _secret, KTOConfig\n")
    assert _trl_imports(probe) == ["trl.trainer.utils", "trl._secret"]


def test_every_seam_name_exists_in_the_installed_trl():
    from trl_kto_ext import trl_internals

    for name, (module, attribute, purpose) in trl_internals.NAMES.items():
        assert purpose, name
        assert hasattr(importlib.import_module(module), attribute), (
            f"{module}.{attribute} is gone from TRL {trl.__version__}"
        )
        assert getattr(trl_internals, name) is getattr(importlib.import_module(module), attribute)
    for hook in trl_internals.PRIVATE_HOOKS:
        assert callable(getattr(trl.KTOTrainer, hook, None)), f"KTOTrainer.{hook} is gone from TRL {trl.__version__}"


def test_every_seam_name_is_used():
    # A name nothing imports any more is a TRL dependency the next release would be checked for in vain.
    from trl_kto_ext import trl_internals

    imported = {
        alias.name
        for path in MODULES.values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "trl_kto_ext.trl_internals"
        for alias in node.names
    }
    unused = sorted(set(trl_internals.NAMES) - imported)
    assert not unused, f"trl_internals.py lists names no module imports: {unused}"


def _trainer_private_names() -> set[str]:
    """Private names of trl.KTOTrainer and transformers.Trainer: class attributes and `self._x` in their sources."""
    names = {n for cls in trl.KTOTrainer.__mro__ for n in vars(cls) if n.startswith("_") and not n.startswith("__")}
    for source in (
        inspect.getsource(importlib.import_module("trl.trainer.kto_trainer")),
        inspect.getsource(transformers.trainer),
    ):
        tree = ast.parse(source)
        names |= {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        }
    return names


@pytest.fixture(scope="module")
def trainer_private_names():
    return _trainer_private_names()


def test_private_trainer_members_used_are_listed_in_the_seam(trainer_private_names):
    from trl_kto_ext import trl_internals

    listed = set(trl_internals.PRIVATE_HOOKS) | set(trl_internals.PRIVATE_ATTRIBUTES)
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        ours = {  # methods of our own classes that only happen to start with "_" are not TRL's
            node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("_")
        }
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        used |= ours
        unlisted = sorted((used & trainer_private_names) - listed)
        assert not unlisted, f"{name} uses private trainer members {unlisted}: list them in trl_internals.py"
