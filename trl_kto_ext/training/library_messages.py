"""Messages of other libraries in a trl-kto-ext run: each warning line names the library it comes from, the ones known
to matter get one line of explanation (once), and those our own set-up causes and a user cannot act on are silenced
where we cause them. Standard library only: the command line installs these before anything heavy is imported."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

PROG = "trl-kto-ext"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # trl_kto_ext/

# (words the message contains, the explanation printed after it, once per process)
NOTES = (
    (
        ("bitsandbytes::", "autograd kernel was not registered"),
        f"{PROG}: the warning above is not safe to ignore: a bitsandbytes 4-bit layer ran its CPU inference kernel, "
        "which has no backward pass, so the layers before it got no gradient. KTOExtTrainer keeps that kernel off on "
        "the model it trains; if this appears in a training run, load the model anew and report it.",
    ),
)

# bitsandbytes logs this at import on CPUs with AVX512-BF16: the `kernels` package it asks for only speeds up the CPU
# inference kernel that KTOExtTrainer keeps off (trl_kto_ext/training/kbit_layers.py), so it asks for nothing we use.
_BNB_KERNELS_NOTICE = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")

_noted: set[str] = set()


def warning_source(filename: str) -> str:
    """The library a warning comes from, by the file Python attributes it to: `trl-kto-ext` for this package, else the
    top-level package or module under the longest matching `sys.path` entry (`transformers`, `torch`, `peft`, a
    user's `myreward`), else the file's name."""
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR + os.sep):
        return PROG
    roots = [os.path.abspath(p or os.curdir) for p in sys.path if isinstance(p, str)]
    root = max((r for r in roots if path.startswith(r.rstrip(os.sep) + os.sep)), key=len, default=None)
    name = os.path.relpath(path, root).split(os.sep)[0] if root else os.path.basename(path)
    return name.removesuffix(".py") or filename


def format_warning(message, category, filename, lineno, line=None) -> str:
    """One line per warning, `SOURCE: Category: message`, SOURCE naming the library ([`warning_source`]); a warning
    listed in [`NOTES`] is followed by its explanation the first time it is shown."""
    text = f"{warning_source(filename)}: {category.__name__}: {message}\n"
    for words, note in NOTES:
        if all(w in str(message) for w in words) and note not in _noted:
            _noted.add(note)
            text += note + "\n"
    return text


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


class _PackageLogHandler(logging.Handler):
    """`trl-kto-ext: warning: message` on stderr (`trl-kto-ext: message` for a line logged with `errors.NOTICE`), written through tqdm so a
    progress bar does not swallow the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            label = "" if getattr(record, "notice", False) else f"{record.levelname.lower()}: "
            text = f"{PROG}: {label}{self.format(record)}"
            tqdm = sys.modules.get("tqdm")  # loaded by transformers whenever a bar can be open
            if tqdm is not None:
                tqdm.tqdm.write(text, file=sys.stderr)
            else:
                sys.stderr.write(text + "\n")
        except Exception:
            self.handleError(record)


def show_package_warnings() -> None:
    """The warnings this package logs (a run that skips steps, data it changed) shown on stderr whatever the logging
    set-up of the process (none, or a root logger set to a higher level by an imported module); called by the
    command line. Idempotent."""
    package = logging.getLogger(PROG.replace("-", "_"))
    if package.getEffectiveLevel() > logging.WARNING:
        package.setLevel(logging.WARNING)
    if not any(isinstance(h, _PackageLogHandler) for h in package.handlers):
        package.addHandler(_PackageLogHandler(logging.WARNING))


def quiet_library_logs() -> None:
    """Drops bitsandbytes' import-time request to install `kernels` (see `_BNB_KERNELS_NOTICE`); call it before
    transformers, peft or bitsandbytes is imported (the command line does, first)."""
    name, start = _BNB_KERNELS_NOTICE
    target = logging.getLogger(name)
    if not any(isinstance(f, _DropMessage) for f in target.filters):
        target.addFilter(_DropMessage(start))


@contextlib.contextmanager
def setup_warnings_silenced():
    """Silences, inside the block, the warnings other libraries give while a trainer is set up that a user cannot act
    on: peft's `PeftModel` reads transformers' deprecated `is_gradient_checkpointing` when TRL wraps the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
