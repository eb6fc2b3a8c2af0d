"""The one error path of every command: problems a user can fix become one line on stderr
(what is wrong, which key or file, what to do) and exit code 2, never a traceback."""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Optional, Sequence


class UserError(Exception):
    """Base of every error a user can fix (bad config, data, checkpoint, evaluation input, a
    non-finite loss): commands print its message as one line and exit with code 2."""


def first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else "unknown error"


def run_cli(main_fn: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command's ``main_fn(argv)`` and map what it raises to an exit code:
    UserError / FileNotFoundError -> 2; other OSError (a full or read-only disk) -> 2; a stop on
    SIGTERM / SIGUSR1 after saving -> 75, on Ctrl-C -> 130 (see ssl_sphere.signals)."""
    from .signals import StopRequested

    try:
        return main_fn(argv)
    except StopRequested as stop:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one says so
            print(f"[ssl_sphere] {stop}; continue with: python -m ssl_sphere.pretrain --resume {stop.checkpoint} "
                  "(or the same command with --resume auto)", file=sys.stderr)
        return stop.exit_code
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        hint = ("free space there or choose another --output-dir / data.cache_dir" if exc.errno == errno.ENOSPC
                else "check the path and its permissions")
        print(f"error: {exc.strerror or first_line(exc)}{where}; {hint} (saved checkpoints are intact)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint (if any) is intact; continue with --resume auto", file=sys.stderr)
        return 130
