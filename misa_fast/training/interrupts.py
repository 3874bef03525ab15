"""Ctrl-C and SIGTERM without losing training.

While a run steps, the first SIGINT (Ctrl-C) or SIGTERM (what a cluster scheduler or Ray sends on
preemption) is only remembered: the loop finishes the step it is in, writes a checkpoint at that
step and raises :class:`Interrupted`, which the command line turns into one line with the resume
command and exit status 128 + the signal (130, 143). A second signal, or one outside the stepping
loop (reading data, compiling, exporting), raises at once. Handlers are installed only in the main
thread (Python allows no other), so a run inside a Ray worker thread keeps Ray's own handling.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``exit_code`` is 128 + the signal number. A subclass of
    KeyboardInterrupt, so that no ``except Exception`` on the way up swallows it."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


class InterruptGuard:
    """Installs the handlers for the ``with`` block and restores the previous ones after it."""

    def __init__(self, command: str):
        self.command = command
        self.pending: Optional[int] = None
        self._deferring = False
        self._previous: dict = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferring(self) -> Iterator["InterruptGuard"]:
        """Inside the block a first signal is remembered in ``pending`` instead of raised."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def _handle(self, signum, frame) -> None:
        if self._deferring and self.pending is None:
            self.pending = signum
            print(f"\nmisa-fast {self.command}: {signal.Signals(signum).name}: saving a checkpoint after this step "
                  "(signal again to stop at once, losing the steps since the last checkpoint)", file=sys.stderr,
                  flush=True)
            return
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name}; nothing was saved since the last "
                                  "checkpoint")
