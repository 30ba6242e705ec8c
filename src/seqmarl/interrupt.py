"""Stopping a training run cleanly on Ctrl-C / SIGTERM / a closed terminal (issue 6: no lost work,
exact resume), and output that survives its reader going away."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

# The signals that stop a run with a checkpoint: Ctrl-C, `kill`, and SIGHUP (the terminal or SSH
# session that started the run closed), whose default action would end the process on the spot.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequests:
    """Ctrl-C / SIGTERM / SIGHUP while training: the first one lets the running iteration finish, writes a
    checkpoint of that boundary (so a resume is exact) and stops; a second one stops at once (the newest
    checkpoint on disk is then where a resume starts). Signal handlers exist only on the main thread;
    elsewhere a KeyboardInterrupt is the immediate stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
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


class _SurvivingStream:
    """A text stream whose writes never raise once its reader has gone (`seqmarl train | head`, a
    closed pipe to `tee`, a hung-up terminal: EPIPE or EIO). Progress output is not worth a training
    run: on the first failed write the descriptor is pointed at /dev/null, so this and every later
    write (tqdm's, a signal handler's, the interpreter's flush at exit) succeed and training goes on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            self._stream.flush()  # what the buffer still holds goes to /dev/null too
        except (OSError, ValueError):  # no descriptor (an in-memory stream): nothing to redirect
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def surviving_output() -> Iterator[None]:
    """sys.stdout and sys.stderr as `_SurvivingStream`s for the duration (restored afterwards)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if isinstance(s, _SurvivingStream) else _SurvivingStream(s) for s in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
