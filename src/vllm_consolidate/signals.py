"""SIGTERM handling shared by the CLI and the batch's worker processes.

A ``kill`` (SIGTERM) would end the process at once, skipping the ``finally`` blocks that remove
temporary folders. Turning it into :class:`KeyboardInterrupt` lets that cleanup run, exactly as for
Ctrl-C (SIGINT).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_raises_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`KeyboardInterrupt` in the main thread; the old handler comes back after.

    Outside the main thread it does nothing: Python only lets the main thread set handlers (and only
    the main thread receives them), so a library caller's worker thread keeps its process's policy.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        # None: the old handler was set outside Python; the default is the closest we can restore.
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


__all__ = ["sigterm_raises_interrupt"]
