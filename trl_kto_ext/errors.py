"""Faults of the user's data, functions or settings found while training runs (a reward function's output, a streamed
row, a diverging loss): the command line prints them as one line `trl-kto-ext: error: ...`, while any other exception
raised during training is a bug and keeps its traceback; and the mark of a logged line that is news rather than a
problem. Standard library only."""

from __future__ import annotations

# `extra=` of a logged line that reports what happened rather than a problem (a reference-cache hit, say): logged at
# WARNING so that it shows, printed on the command line without the `warning:` label (training/library_messages.py).
NOTICE = {"notice": True}


class UserFault(Exception):
    """Base of the exceptions that name a fault of the user's input and its fix; catch this to tell them from bugs."""


class UserInputError(UserFault, ValueError):
    """A value the user gave is unusable: a reward function's output, a data row, a label, a score. A ValueError, so
    `except ValueError` keeps working."""


class UserFunctionError(UserFault, RuntimeError):
    """An exception raised inside a user's function (a reward function), with where it happened; the original is
    chained as `__cause__`. A RuntimeError, as before."""
