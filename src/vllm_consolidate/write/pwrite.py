"""Positional writes that finish: shared by the safetensors writer and the quantizing jobs (no import loop)."""

from __future__ import annotations

import os


def pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked); returns its length."""
    written = os.pwrite(fd, data, offset)
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)
    return written


__all__ = ["pwrite_all"]
