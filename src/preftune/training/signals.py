"""SIGTERM and SIGINT during training: finish the optimizer step, checkpoint it, then stop.

A cluster preempts a job with SIGTERM (and kills it some seconds later); a user presses Ctrl-C.
Either one only sets a flag here; the loop reads it after each optimizer step, writes a checkpoint
and raises ``RunStopped``. A second Ctrl-C stops at once (KeyboardInterrupt), as users expect.
"""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT request a stop instead of killing the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signal.Signals(signum)
