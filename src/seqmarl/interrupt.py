"""Stopping a training run cleanly on Ctrl-C / SIGTERM (issue 6: no lost work, exact resume)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StopRequests:
    """Ctrl-C / SIGTERM while training: the first one lets the running iteration finish, writes a
    checkpoint of that boundary (so a resume is exact) and stops; a second one stops at once (the newest
    checkpoint on disk is then where a resume starts). Signal handlers exist only on the main thread;
    elsewhere a KeyboardInterrupt is the immediate stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "seqmarl: stopping after the current iteration (a checkpoint follows); signal again to stop now",
            file=sys.stderr,
            flush=True,
        )
