"""The errors a user can fix, and how background threads hand theirs to the main thread.

Every command maps a :class:`UserError` to one line on stderr and exit code 2
(``ssl_sphere.cli.common.handle_errors``); nothing a user can cause ends in a traceback.
"""

from __future__ import annotations

import threading
from typing import List, Optional


class UserError(Exception):
    """Base of every error a user can fix (bad config, data, checkpoint, evaluation input, a
    non-finite loss): commands print its message as one line and exit with code 2."""


def first_line(obj) -> str:
    """The first line of an exception's message (or of a text): what a one-line report shows.
    An exception without a message gives its type's name."""
    text = str(obj).strip()
    if text:
        return text.splitlines()[0]
    return type(obj).__name__ if isinstance(obj, BaseException) else "unknown error"


class ThreadErrors:
    """While active (a context manager), an exception that ends a background thread (TensorBoard's
    event writer, a prefetch worker) is kept here instead of being printed as a traceback by
    ``threading.excepthook``; :meth:`raise_first` re-raises the first one in the calling (main)
    thread, so it takes the command's one error path. Exceptions of the main thread are untouched."""

    def __init__(self):
        self.errors: List[BaseException] = []
        self._old = None

    def _hook(self, args) -> None:
        if args.exc_type is SystemExit:
            return
        self.errors.append(args.exc_value if args.exc_value is not None else args.exc_type())

    def __enter__(self) -> "ThreadErrors":
        self._old = threading.excepthook
        threading.excepthook = self._hook
        return self

    def __exit__(self, exc_type, exc, tb) -> Optional[bool]:
        threading.excepthook = self._old
        if exc_type is None:
            self.raise_first()
        return None

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]
