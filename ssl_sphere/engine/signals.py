"""Stop requests from a cluster scheduler or the user (SIGTERM, SIGUSR1, Ctrl-C): the handlers
only record the request; the training loop stops at a step boundary that every rank agrees on,
saves, and exits with a documented code."""

from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

#: exit codes of a run stopped by a signal after saving: 75 (EX_TEMPFAIL, "try again") for the
#: scheduler's SIGTERM / SIGUSR1 (SLURM preemption, --signal=USR1@120), 130 for Ctrl-C
EXIT_CODES: Dict[int, int] = {signal.SIGTERM: 75, signal.SIGUSR1: 75, signal.SIGINT: 130}


class StopRequested(Exception):
    """The run stopped on a signal after saving ``checkpoint`` at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = EXIT_CODES.get(signum, 75)
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {checkpoint}")


class StopSignals:
    """While active (a context manager), SIGTERM, SIGUSR1 and SIGINT set ``received`` to the
    first signal's number instead of ending the process. A second Ctrl-C interrupts at once
    (KeyboardInterrupt; the last checkpoint stays intact). Handlers can only be installed from
    the main thread; elsewhere this does nothing and signals keep their usual effect."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_CODES:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
