"""Checks of a `trl-kto-ext` YAML config and of its flags: malformed YAML (file, line, column), unknown keys and
options (with the closest valid one), wrong types and invalid choices, each as one line and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import enum
import inspect
import os
import re
import types
import typing
from typing import Any

import yaml

PROG = "trl-kto-ext"
BOOL_WORDS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")  # what TRL's string_to_bool accepts


def _fail(message: str) -> typing.NoReturn:
    raise SystemExit(f"{PROG}: error: {message}")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader whose booleans are only true/false: `eval_strategy: no` stays the string 'no' (YAML 1.2)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != _BOOL_TAG] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml_config(path: str) -> dict[str, Any]:
    """The mapping of a YAML config file; SystemExit naming the file (and line) when it is missing or malformed."""
    if not os.path.isfile(path):
        _fail(f"config file {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.load(f, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        _fail(f"malformed YAML in {_yaml_error(err, path)}. Fix the syntax there.")
    if not isinstance(config, dict | None):
        _fail(f"config file {path} must hold a mapping of `option: value` lines, got a {type(config).__name__}.")
    return config or {}


def _yaml_error(err: yaml.YAMLError, path: str) -> str:
    """'FILE, line L, column C: problem', at the line where the faulty construct starts.

    PyYAML marks where it noticed the problem (for `max_steps 5` on line 3, the start of line 4); its context mark,
    when earlier, is where the faulty key, bracket or quote begins: that is the line to report.
    """
    problem, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    if problem is None:
        return f"{path}: {err}"
    text = getattr(err, "problem", None) or str(err)
    if text == "could not find expected ':'":
        text += " (write `key: value`, with a colon and a space)"
    mark = problem
    if context is not None and (context.line, context.column) < (problem.line, problem.column):
        mark = context
        text += f"; {err.context} here, the parser stopped at line {problem.line + 1}, column {problem.column + 1}"
    return f"{path}, line {mark.line + 1}, column {mark.column + 1}: {text}"


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else f" Run `{PROG} --help` for the valid options."


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal or (inspect.isclass(tp) and issubclass(tp, enum.Enum)):
        return "one of " + ", ".join(map(repr, args if origin is typing.Literal else [x.value for x in tp]))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(map(_type_name, args))}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return str(value) in map(str, args)
    if inspect.isclass(tp) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or str(value) in [str(x.value) for x in tp]
    if origin is list:  # a single value stands for a list of one, as with a flag (`--lora_target_modules q_proj`)
        items = value if isinstance(value, list) else [value]
        return all(_matches(v, args[0] if args else Any) for v in items)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(value, str) and tp in (int, float):  # argparse converts a string default with the field type
        with contextlib.suppress(ValueError):
            return tp(value) is not None
        return False
    if tp is bool:
        return isinstance(value, bool) or str(value).lower() in BOOL_WORDS
    if tp in (int, float, str) and isinstance(value, bool):
        return False
    return isinstance(value, {int: int, float: (int, float), str: (str, int, float)}.get(tp, object))


def check_config(config: dict[str, Any], parser: argparse.ArgumentParser, path: str) -> None:
    """Unknown keys (with the closest valid one), wrong types and invalid choices, each named in plain words."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "print_config", "config", "help_all")}
    actions.pop(argparse.SUPPRESS, None)
    hints = {name: tp for dc in parser.dataclass_types for name, tp in typing.get_type_hints(dc).items()}
    for key, value in config.items():
        if key not in actions:
            _fail(f"unknown key `{key}` in {path}.{_suggest(str(key), list(actions))}")
        choices = actions[key].choices
        values = value if isinstance(value, list) and actions[key].nargs == "+" else [value]
        bad_choice = choices and value is not None and any(str(v) not in map(str, choices) for v in values)
        if bad_choice:
            _fail(f"`{key}: {value!r}` in {path} is not a valid choice: use one of {', '.join(map(str, choices))}.")
        if key in hints and not _matches(value, hints[key]):
            expected, got = _type_name(hints[key]), type(value).__name__
            _fail(f"`{key}: {value!r}` in {path} has the wrong type: {key} expects {expected} (got {got}).")


def check_flags(args: list[str], parser: argparse.ArgumentParser) -> None:
    known = set(parser._option_string_actions)
    for arg in args:
        if arg.startswith("--") and (name := arg.split("=", 1)[0]) not in known:
            options = [o[2:] for o in known if o.startswith("--") and "-" not in o[2:]]
            close = difflib.get_close_matches(name[2:].replace("-", "_"), options, n=1, cutoff=0.6)
            hint = f" Did you mean `--{close[0]}`?" if close else f" Run `{PROG} --help` for the valid options."
            _fail(f"unknown option `{name}`.{hint}")
