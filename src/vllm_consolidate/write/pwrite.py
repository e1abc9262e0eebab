"""Positional writes that finish: shared by the safetensors writer and the quantizing jobs (no import loop)."""

from __future__ import annotations

from typing import Union

from vllm_consolidate.posix_write import pwrite_fd
from vllm_consolidate.storage.upload import ObjectSink

#: Where the writer's jobs write: a local file's descriptor, or an object being uploaded (``--output s3://…``).
Out = Union[int, ObjectSink]  # noqa: UP007 - a runtime alias


def pwrite_all(fd: Out, data: memoryview, offset: int) -> int:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked); returns its length."""
    if not isinstance(fd, int):
        return fd.pwrite(data, offset)
    return pwrite_fd(fd, data, offset)


__all__ = ["Out", "pwrite_all"]
