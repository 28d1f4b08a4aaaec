"""A reward function in the user's own module (`--reward_funcs myreward.antonym`) is found next to the --config file
or in the working directory without PYTHONPATH; a module found nowhere, broken, or shadowed is named in one line."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from trl_kto_ext.__main__ import main
from trl_kto_ext.online.rewards import import_reward_function, load_reward_funcs

ROOT = Path(__file__).resolve().parents[2]

REWARD_MODULE = """
import json, os

def antonym(prompts, completions, **kwargs):
    from {helper} import score  # a file next to this one, imported when called
    with open(os.environ["REWARD_CALLS"], "a") as f:
        f.write(json.dumps(completions) + "\\n")
    return [score(c) for c in completions]
"""
HELPER_MODULE = "def score(completion):\n    return float(len(completion) % 2)\n"


@pytest.fixture
def clean_imports():
    """The test modules (`myreward*`) and sys.path entries a test adds are removed again."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in [name for name in sys.modules if name.startswith("myreward")]:
        del sys.modules[name]


def _write_module(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(REWARD_MODULE.format(helper=f"{name}_helper"))
    (folder / f"{name}_helper.py").write_text(HELPER_MODULE)


def _online_argv(config: Path, out: Path, reward: str) -> list[str]:
    base = (ROOT / "configs" / "online-tiny.yaml").read_text()
    config.write_text(
        base.replace("reward_funcs: [trl_kto_ext.models.tiny.exact_answer_reward]", f"reward_funcs: [{reward}]")
    )
    return ["online", "--config", str(config), "--max_steps", "1", "--logging_steps", "1", "--report_to", "none",
            "--disable_tqdm", "true", "--num_generations", "2", "--per_device_train_batch_size", "8",
            "--one_class", "train",  # the step trains whatever its labels: a run that trains nothing exits non-zero
            "--output_dir", str(out)]  # fmt: skip


def _check_run(out: Path, calls: Path) -> None:
    completions = [c for line in calls.read_text().splitlines() for c in json.loads(line)]
    assert len(completions) == 8  # one step: 4 prompts x 2 samples, every one scored by the user's function
    expected = sum(len(c) % 2 for c in completions) / len(completions)  # the helper's rule, recomputed here
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "online/reward" in e]
    assert logs[0]["online/rewards/antonym"] == pytest.approx(expected)


def test_cli_finds_a_reward_module_next_to_the_config(tiny_default, tmp_path, monkeypatch, clean_imports):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    _write_module(project, "myreward_cfg")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory is not the config's folder
    monkeypatch.setenv("REWARD_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert main(_online_argv(project / "run.yaml", tmp_path / "out", "myreward_cfg.antonym")) == 0
    _check_run(tmp_path / "out", tmp_path / "calls.jsonl")


def test_cli_finds_a_reward_module_in_the_working_directory(tiny_default, tmp_path, monkeypatch, clean_imports):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))]
    )  # as the console script
    _write_module(tmp_path, "myreward_cwd")
    monkeypatch.setenv("REWARD_CALLS", str(tmp_path / "calls.jsonl"))
    configs = tmp_path / "configs"
    configs.mkdir()
    assert main(_online_argv(configs / "run.yaml", tmp_path / "out", "myreward_cwd.antonym")) == 0
    _check_run(tmp_path / "out", tmp_path / "calls.jsonl")


def test_cli_reward_module_found_nowhere_is_one_line(tmp_path, monkeypatch, clean_imports):
    monkeypatch.chdir(tmp_path)
    configs = tmp_path / "configs"
    configs.mkdir()
    with pytest.raises(SystemExit) as info:
        main(_online_argv(configs / "run.yaml", tmp_path / "out", "nosuchreward.antonym"))
    assert str(info.value.code) == (
        "trl-kto-ext: error: Cannot import the reward function 'nosuchreward.antonym': no module named 'nosuchreward' "
        f"is installed, and there is no nosuchreward.py (or nosuchreward/ package) in {configs}, {tmp_path}. Put "
        "nosuchreward.py next to your config file or in the working directory, or give a dotted path importable from "
        "this environment (e.g. trl_kto_ext.models.tiny.exact_answer_reward)."
    )


def test_python_api_looks_in_the_working_directory(tmp_path, monkeypatch, clean_imports):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    _write_module(tmp_path, "myreward_api")
    monkeypatch.setenv("REWARD_CALLS", str(tmp_path / "calls.jsonl"))
    (func,) = load_reward_funcs(["myreward_api.antonym"])
    assert func(prompts=["a", "b"], completions=["xy", "xyz"]) == [0.0, 1.0]
    assert sys.path[-1] == str(tmp_path)  # appended last: never shadows an installed module


def test_a_package_folder_and_a_nested_function(tmp_path, clean_imports):
    package = tmp_path / "myrewardpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text(
        "def exact(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n"
    )
    func = import_reward_function("myrewardpkg.rules.exact", [str(tmp_path)])
    assert func(prompts=["p"], completions=["c"]) == [1.0]


def test_broken_and_incomplete_modules_are_named(tmp_path, clean_imports):
    (tmp_path / "myreward_broken.py").write_text("def antonym(:\n")
    with pytest.raises(ValueError, match=r"^Importing the reward module 'myreward_broken' raised SyntaxError: "):
        import_reward_function("myreward_broken.antonym", [str(tmp_path)])
    (tmp_path / "myreward_dep.py").write_text("import numpy_that_is_not_there\n")
    with pytest.raises(ValueError) as info:
        import_reward_function("myreward_dep.antonym", [str(tmp_path)])
    assert str(info.value) == (
        "Importing the reward module 'myreward_dep' failed: No module named 'numpy_that_is_not_there'. Install what "
        "it imports."
    )
    (tmp_path / "myreward_noattr.py").write_text("x = 1\n")
    with pytest.raises(ValueError) as info:
        import_reward_function("myreward_noattr.antonym", [str(tmp_path)])
    assert str(info.value) == (
        f"Reward function 'myreward_noattr.antonym': module 'myreward_noattr' ({tmp_path / 'myreward_noattr.py'}) has "
        "no callable named 'antonym'."
    )


def test_a_local_module_shadowed_by_an_installed_one_is_named(tmp_path, clean_imports):
    (tmp_path / "json.py").write_text(textwrap.dedent("def antonym(prompts, completions, **kw):\n    return []\n"))
    with pytest.raises(ValueError) as info:
        import_reward_function("json.antonym", [str(tmp_path)])
    message = str(info.value)
    assert message.startswith("Reward function 'json.antonym': module 'json' (")
    assert message.endswith(
        f"has no callable named 'antonym'. Your json.py in {tmp_path} is not the module imported: rename it (an "
        "installed module has that name)."
    )
