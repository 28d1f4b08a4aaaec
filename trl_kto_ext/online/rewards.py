"""Reward functions of online KTO: loading (callable, dotted path, reward model), calling, checking and labelling."""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trl_kto_ext.data.scores import LABEL_MODES, label_scores
from trl_kto_ext.errors import UserFunctionError, UserInputError

__all__ = ["LABEL_MODES", "call_reward_func", "combine_rewards", "label_rewards", "load_reward_funcs"]


def load_reward_funcs(
    reward_funcs, model_init_kwargs: dict[str, Any] | None = None, search_dirs: Sequence[str] | None = None
) -> list[Any]:
    """Reward functions as a list of callables and `nn.Module` reward models.

    Each entry may be a callable, a dotted path to one (`"package.module.function"`, see [`import_reward_function`];
    `search_dirs` defaults to the working directory), a sequence-classification model, or the name/path of one (loaded
    with `AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`, as TRL's GRPOTrainer does).
    Raises ValueError for an empty list and for a string that is neither.
    """
    items = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    if reward_funcs is None or not items:
        raise ValueError(
            "Online KTO needs at least one reward function (`reward_funcs`): a callable "
            "`f(prompts, completions, **kwargs) -> list[float]`, a dotted path to one, or a reward model."
        )
    dirs = [os.getcwd()] if search_dirs is None else list(search_dirs)
    return [_load_one(item, model_init_kwargs or {}, dirs) for item in items]


def is_dotted_path(item) -> bool:
    """True for a string read as `module.function` rather than a reward model's name or path."""
    return (
        isinstance(item, str)
        and bool(item.rpartition(".")[0])
        and "/" not in item
        and not os.path.exists(os.path.expanduser(item))
    )


def import_reward_function(item: str, search_dirs: Sequence[str] = ()) -> Callable:
    """The callable at the dotted path `item` (`"module.function"`, `"package.module.function"`).

    Imported as usual; when its top-level module is not importable, it is looked for as `<module>.py` (or a package
    folder `<module>/`) in `search_dirs`, in order (the CLI gives the folder of its --config file, then the working
    directory). A folder it is found in is appended to `sys.path` (last, so it never shadows an installed module),
    so that the module's own imports of the files next to it work too.

    Raises:
        ValueError: the module is found nowhere (naming the folders searched), raises while it is imported, or has
            no callable of that name (naming a same-named file in `search_dirs` shadowed by an installed module).
    """
    module_name, _, attr = item.rpartition(".")
    top = module_name.split(".")[0]
    dirs = [os.path.abspath(d) for d in dict.fromkeys(search_dirs)]
    local = next((d for d in dirs if _holds_module(d, top)), None)
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing_is_ours = err.name is not None and (module_name + ".").startswith(err.name + ".")
            if not missing_is_ours or local is None or err.name != top:
                raise
            if local not in sys.path:
                sys.path.append(local)
            importlib.invalidate_caches()
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name + ".").startswith(err.name + "."):
            where = ", ".join(dirs) if dirs else "no folder"
            raise ValueError(
                f"Cannot import the reward function {item!r}: no module named {err.name!r} is installed, and there is "
                f"no {top}.py (or {top}/ package) in {where}. Put {top}.py next to your config file or in the working "
                "directory, or give a dotted path importable from this environment (e.g. "
                "trl_kto_ext.models.tiny.exact_answer_reward)."
            ) from err
        raise ValueError(
            f"Importing the reward module {module_name!r} failed: {err}. Install what it imports."
        ) from err
    except Exception as err:  # a syntax error or an exception raised by the module's own code
        raise ValueError(
            f"Importing the reward module {module_name!r} raised {type(err).__name__}: {err}. Fix the module."
        ) from err
    func = getattr(module, attr, None)
    if not callable(func):
        source = getattr(module, "__file__", None) or module_name
        shadowed = (
            f" Your {top}.py in {local} is not the module imported: rename it (an installed module has that name)."
            if local is not None and not os.path.abspath(str(source)).startswith(local + os.sep)
            else ""
        )
        raise ValueError(
            f"Reward function {item!r}: module {module_name!r} ({source}) has no callable named {attr!r}.{shadowed}"
        )
    return func


def _holds_module(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, f"{name}.py")) or os.path.isfile(
        os.path.join(folder, name, "__init__.py")
    )


def _load_one(item, model_init_kwargs: dict[str, Any], search_dirs: Sequence[str]):
    if not isinstance(item, str):
        if isinstance(item, torch.nn.Module) or callable(item):
            return item
        raise ValueError(f"A reward function must be a callable, a dotted path or a reward model; got {item!r}.")
    if is_dotted_path(item):
        return import_reward_function(item, search_dirs)
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(item, num_labels=1, **model_init_kwargs).eval()


def reward_func_name(func) -> str:
    """The name used in logs and messages: a model's name or path, else the function's `__name__`."""
    if isinstance(func, torch.nn.Module):
        return str(getattr(func.config, "_name_or_path", type(func).__name__)).rstrip("/").split("/")[-1]
    return getattr(func, "__name__", type(func).__name__)


def call_reward_func(
    func: Callable, name: str, prompts: list, completions: list, completion_ids: list[list[int]], **kwargs
) -> list[float | None]:
    """Calls one reward function on a batch and checks its output; returns one float (or None) per completion.

    None means "this function does not score this completion" (as in TRL's GRPOTrainer); the caller requires some
    function to score every completion. Raises [`UserInputError`] (a ValueError) naming `name` for an output of the
    wrong length, a NaN, an infinity or a non-number, and [`UserFunctionError`] (a RuntimeError) for an exception
    raised inside it, with the line of the function that raised and the prompt and completion that trigger it.
    """
    n = len(completions)
    try:
        output = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    except Exception as err:
        row = _first_failing_row(func, prompts, completions, completion_ids, kwargs)
        where = (
            f"on prompt {prompts[row]!r} with completion {completions[row]!r}"
            if row is not None
            else f"on a batch of {n} completions (first prompt {prompts[0]!r}; no single completion reproduces it)"
        )
        raise UserFunctionError(
            f"Reward function '{name}' raised {type(err).__name__}: {err} {_raised_at(func, err)}{where}."
        ) from err
    if isinstance(output, torch.Tensor):
        output = output.tolist()
    try:
        values = list(output)
    except TypeError:
        raise UserInputError(
            f"Reward function '{name}' returned {type(output).__name__}, not a list: it must return one number per "
            f"completion ({n} here)."
        ) from None
    if len(values) != n:
        raise UserInputError(
            f"Reward function '{name}' returned {len(values)} rewards for {n} completions: it must return exactly "
            "one reward per completion, in the order of `completions`."
        )
    checked = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise UserInputError(
                f"Reward function '{name}' returned {value!r} ({type(value).__name__}) for completion {i} "
                f"(prompt {prompts[i]!r}): rewards must be numbers (int, float or bool), or None to abstain."
            )
        value = float(value)
        if not math.isfinite(value):
            raise UserInputError(
                f"Reward function '{name}' returned {value} for completion {i} (prompt {prompts[i]!r}, completion "
                f"{completions[i]!r}): rewards must be finite numbers (a NaN or infinite reward cannot be compared "
                "with the others). Return a finite number, or None where the function does not apply."
            )
        checked.append(value)
    return checked


def _raised_at(func, err: BaseException) -> str:
    """'at FILE, line N (in FUNC) ' for the innermost frame of `err`'s traceback in the file `func` is defined in (the
    user's own line), else its innermost frame; '' without a traceback."""
    frames = traceback.extract_tb(err.__traceback__)[1:]  # the first frame is the call in `call_reward_func`
    if not frames:
        return ""
    source = getattr(getattr(func, "__code__", None), "co_filename", None)
    own = [f for f in frames if f.filename == source]
    frame = (own or frames)[-1]
    return f"at {frame.filename}, line {frame.lineno} (in {frame.name}) "


def _first_failing_row(func, prompts, completions, completion_ids, kwargs) -> int | None:
    """Index of the first completion on which `func`, called on that completion alone, raises (None if none does)."""
    for i in range(len(completions)):
        row_kwargs = {
            k: ([v[i]] if isinstance(v, list) and len(v) == len(completions) else v) for k, v in kwargs.items()
        }
        try:
            func(prompts=[prompts[i]], completions=[completions[i]], completion_ids=[completion_ids[i]], **row_kwargs)
        except Exception:
            return i
    return None


def combine_rewards(per_func: list[list[float | None]], weights: Sequence[float], names: list[str], prompts) -> list:
    """Weighted sum over functions of each completion's rewards; None entries are left out (GRPO's `nansum`).

    Raises [`UserInputError`] (a ValueError) when no function scores a completion (every entry None).
    """
    totals = []
    for i in range(len(per_func[0])):
        scored = [(w, rewards[i]) for w, rewards in zip(weights, per_func) if rewards[i] is not None]
        if not scored:
            raise UserInputError(
                f"Every reward function ({', '.join(names)}) returned None for completion {i} (prompt "
                f"{prompts[i]!r}): at least one must score each completion."
            )
        totals.append(sum(w * r for w, r in scored))
    return totals


def label_rewards(
    rewards: Sequence[float], group_size: int, mode: str = "threshold", threshold: float = 0.5
) -> list[bool | None]:
    """Desirable (True) / undesirable (False) labels from rewards; None for a row left out.

    `rewards` holds consecutive groups of `group_size` completions of one prompt each. The rule is
    [`trl_kto_ext.data.scores.label_scores`], shared with offline data labelled from a `score` column:
    - `"threshold"`: desirable iff reward >= threshold (a verifier's 1/0 with threshold 0.5). No row is left out.
    - `"relative"`: desirable iff reward > the mean reward of its own group; a reward equal to the mean (a tie) is
      undesirable. A group whose rewards are all equal carries no preference and is left out (None for every row).
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {mode!r}.")
    if len(rewards) % group_size:
        raise ValueError(f"got {len(rewards)} rewards, not a multiple of the group size {group_size}.")
    return label_scores(rewards, [i // group_size for i in range(len(rewards))], mode, threshold)
