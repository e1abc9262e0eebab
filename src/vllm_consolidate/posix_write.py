"""Positional writes to a descriptor that finish, in the lowest layer so that every layer can use them.

``os.pwrite`` may write fewer bytes than asked (a signal, a file-size limit, some file systems past 2 GiB in
one call): the writer's output files (:mod:`vllm_consolidate.write.pwrite`) and the validation's spill file
(:mod:`vllm_consolidate.storage.streamed`) both loop until every byte is written, here.
"""

from __future__ import annotations

import os
from typing import Any


def pwrite_fd(fd: int, data: Any, offset: int) -> int:
    """Write all of ``data`` (any contiguous buffer) to ``fd`` at ``offset``; returns its length in bytes."""
    view = memoryview(data).cast("B")
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)
    return written


__all__ = ["pwrite_fd"]
