"""Checks of a `trl-kto-ext` YAML config and of its flags: malformed YAML (file, line, column), unknown keys and
options (with the closest valid one), wrong types and invalid choices, each as one line and a non-zero exit."""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)
import argparse
import contextlib
import difflib
import enum
import inspect
import os
import re
import types
import typing
import warnings
from dataclasses import fields
from typing import Any

import yaml
from trl import TrlParser

from trl_kto_ext.cli.help import HELP_TEXTS, OTHER_GROUP, GroupedHelpMixin, HelpAllAction, HelpFormatter, group_options
from trl_kto_ext.training.library_messages import format_warning, show_package_warnings

PROG = "trl-kto-ext"
BOOL_WORDS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")  # what TRL's string_to_bool accepts


def _fail(message: str) -> typing.NoReturn:
    raise SystemExit(f"{PROG}: error: {message}")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader whose booleans are only true/false: `eval_strategy: no` stays the string 'no' (YAML 1.2), and where
    a key given twice in one mapping is an error rather than the last value silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                first, again = seen[key] + 1, key_node.start_mark.line + 1
                problem = f"`{key}` is given twice (lines {first} and {again}): keep one"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


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


# Names other tools use for an option of this command: suggested before any spelling match.
_OTHER_NAMES = {
    "batch_size": "per_device_train_batch_size",
    "train_batch_size": "per_device_train_batch_size",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "model": "model_name_or_path",
    "model_name": "model_name_or_path",
    "dataset": "dataset_name",
    "data": "dataset_name",
    "data_path": "dataset_name",
    "steps": "max_steps",
    "output": "output_dir",
}


def _suggest(name: str, options: list[str], prefix: str = "") -> str:
    """` Did you mean `<prefix><option>`?` for another tool's name of an option or a close spelling, else where to look."""
    known = _OTHER_NAMES.get(name)
    close = [known] if known in options else difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" Did you mean `{prefix}{close[0]}`?" if close else f" Run `{PROG} --help` for the valid options."


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
            if isinstance(value, dict):
                _fail(
                    f"unknown key `{key}` in {path}, holding a section ({', '.join(map(str, list(value)[:3]))}...): "
                    "every option is a top-level key of the file. Move its keys out of the section."
                )
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
            _fail(f"unknown option `{name}`.{_suggest(name[2:].replace('-', '_'), options, prefix='--')}")


class _Parser(GroupedHelpMixin, TrlParser):
    def error(self, message):  # argparse would print the whole (very long) usage first
        raise SystemExit(f"{PROG}: error: {message}\nRun `{PROG} --help` to list the options.")


def new_parser(dataclass_types: tuple, prog: str | None, usage: str, description: str, groups: dict) -> TrlParser:
    """A command's TrlParser over `dataclass_types`: --config, --print-config, --help by `groups`, --help-all."""
    parser = _Parser(
        dataclass_types,
        prog=prog,
        usage=usage,
        description=description,
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--help-all", "--help_all", action=HelpAllAction, help="Show every option and exit.")
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of `option: value` lines (any option below); flags override it."
    )
    parser.add_argument(
        "--print-config", "--print_config", action="store_true", help="Print the resolved config as YAML and exit."
    )
    group_options(parser, groups, OTHER_GROUP, HELP_TEXTS, more=f"run `{prog} --help-all` to list them")
    return parser


def config_path(argv: list[str]) -> str | None:
    """The file given with `--config FILE` / `--config=FILE` in `argv`, else None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.partition("=")[2]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


# A negative number argparse would take for an option: it only knows `-1` and `-1.5` as numbers, not `-1e-8` or `-inf`.
_NEGATIVE_NUMBER = re.compile(r"-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|-(?:inf|infinity|nan)", re.IGNORECASE)


def join_negative_values(
    args: list[str], single_value: typing.Callable[[str], bool] = lambda option: True
) -> list[str]:
    """`--opt -1e-8` as `--opt=-1e-8`, so a negative value in any notation reaches the option's own range check.
    Only for options that take one value (`single_value(option)`): `--reward_weights -1 2` stays as given."""
    out = []
    for arg in args:
        last = out[-1] if out else ""
        if last.startswith("--") and "=" not in last and _NEGATIVE_NUMBER.fullmatch(arg) and single_value(last):
            out[-1] = f"{last}={arg}"
        else:
            out.append(arg)
    return out


def _takes_one_value(parser: argparse.ArgumentParser) -> typing.Callable[[str], bool]:
    def single(option: str) -> bool:
        action = parser._option_string_actions.get(option)
        return action is not None and action.nargs in (None, "?", 1)

    return single


_loaded_config: list[str] = []  # the --config file of this run, for missing_file_hint


def missing_file_hint(err: Exception) -> str:
    """For a missing data file: the step the run's config names in its launch line (`# Launch: ... (first: CMD)`,
    as the shipped configs whose data a script writes), e.g. " configs/x.yaml says to run first: CMD."; else ""."""
    if not isinstance(err, FileNotFoundError) or not _loaded_config:
        return ""
    try:
        with open(_loaded_config[-1]) as handle:
            first = handle.readline()
    except OSError:
        return ""
    step = re.search(r"\(first: ([^)]+)\)", first)
    return f" {_loaded_config[-1]} says to run first: {step.group(1).strip()}" if step else ""


def parse_args(argv: list[str], parser: TrlParser) -> tuple[Any, ...]:
    """(script_args, training_args, model_args, print_config), from `--config FILE` and flags like `trl kto`."""
    args = join_negative_values(list(argv), _takes_one_value(parser))
    i = next((i for i, a in enumerate(args) if a == "--config" or a.startswith("--config=")), None)
    if i is not None:
        path = args.pop(i).partition("=")[2] or (args.pop(i) if i < len(args) else _fail("--config needs a file."))
        config = load_yaml_config(path)
        _loaded_config.append(path)
        env = config.pop("env", {})
        if not isinstance(env, dict):
            _fail(f"`env` in {path} must be a mapping of environment variables.")
        os.environ.update({str(k): str(v) for k, v in env.items()})
        check_config(config, parser, path)
        parser.set_defaults_with_config(**config)
    check_flags(args, parser)
    hardware_check = contextlib.nullcontext()
    if {"--print-config", "--print_config"} & set(args):  # print a GPU config (bf16: true) on any machine
        hardware_check = _bf16_reported_available()
    try:
        with hardware_check:
            *dataclasses, extra = parser.parse_args_into_dataclasses(args=args)
    except (ValueError, TypeError) as err:  # a dataclass __post_init__ check (e.g. loss_aversion_target range)
        _fail(str(err))
    return (*dataclasses, extra.print_config)


@contextlib.contextmanager
def _bf16_reported_available():
    """transformers' bf16 hardware check answers True inside the block (for --print-config only: no model runs)."""
    import transformers.training_args as training_args_module

    saved = training_args_module.is_torch_bf16_gpu_available
    training_args_module.is_torch_bf16_gpu_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        training_args_module.is_torch_bf16_gpu_available = saved


def format_config(script_args, training_args, model_args) -> str:
    """All dataclass values as one YAML mapping (usable again with --config), grouped by dataclass."""
    parts = []
    for args in (script_args, model_args, training_args):
        values = args.to_dict() if hasattr(args, "to_dict") else {f.name: getattr(args, f.name) for f in fields(args)}
        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}
        parts.append(f"# --- {type(args).__name__} ---\n" + yaml.safe_dump(values, sort_keys=False))
    return "\n".join(parts)


# Keyword arguments of trl_kto_ext.data.loading that are also options of this command, as messages name them in Python.
_KEYWORDS = re.compile(
    r"(?<![\w-])((?:prompt|completion|label|chosen|rejected|weight|score)_column|(?:un)?desirable_fraction|eval_fraction"
    r"|max_length)(=\s?)?"
)


def as_flags(message: str) -> str:
    """A message of the Python API in command-line words: `prompt_column=<x>` becomes `--prompt_column <x>`."""
    message = _KEYWORDS.sub(lambda m: f"--{m.group(1)}" + (" " if m.group(2) else ""), message)
    return re.sub(r"(?<![\w-])split=\s?", "--dataset_train_split / --dataset_test_split ", message)


def one_line_warnings() -> None:
    """Python warnings printed as one line each from here on, `SOURCE: Category: message` with SOURCE the library the
    warning comes from (`trl-kto-ext` for ours; see trl_kto_ext/training/library_messages.py), and this package's
    logged warnings as `trl-kto-ext: warning: message` lines. The commands call it first."""
    warnings.formatwarning = format_warning
    show_package_warnings()
