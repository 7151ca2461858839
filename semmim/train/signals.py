"""Interrupts: a stop request the loop honours between steps; signals blocked while DataLoader
workers are forked."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any


class StopRequest:
    """SIGINT/SIGTERM handler that records the request; the loop stops after the current step.

    A second SIGINT raises KeyboardInterrupt at once (a human pressing Ctrl-C twice); SIGTERM never
    escalates (launchers such as torchrun forward it, so a rank may receive it twice). Forked
    processes that inherit the handler ignore it (only the process that installed it stops).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._pid = os.getpid()
        self._sigints = 0
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        self.signum = signum
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                raise KeyboardInterrupt("second SIGINT: exiting without a checkpoint")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        """Handle SIGINT and SIGTERM from now on (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        """Put the previous handlers back (a signal then acts as it did before)."""
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_blocked():
    """Block SIGINT/SIGTERM in this thread; processes forked meanwhile keep them blocked.

    DataLoader workers are forked under this, so a signal to the process group leaves them alive
    (the trainer stops them itself); a signal to this process stays pending, not lost, until the
    block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
