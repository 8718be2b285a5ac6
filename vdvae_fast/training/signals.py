"""Stopping on request: SIGINT/SIGTERM end the current update or evaluation batch, then the run saves and exits.

The handlers are the process's, so the request is too: while a StopRequest is active, ``stop_requested`` tells
any part of the run (the update loop, an evaluation between two batches) which signal arrived, if any.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["StopRequest", "stop_requested"]

_active: list[StopRequest] = []  # the StopRequest whose handlers are installed, innermost last


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads after each update and evaluation reads after each batch
    (then the run saves and exits); a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _active.remove(self)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def stop_requested() -> int | None:
    """The signal number that asked the active StopRequest to stop, or None (also when none is active)."""
    return _active[-1].signum if _active else None
