"""Reading byte ranges of source files: shared by the writer and the checks that compare with a source.

A tensor's bytes are a list of :class:`~vllm_consolidate.source.Segment` ranges. :func:`iter_chunks`
reads them in fixed-size chunks with positional reads into a reused buffer, so memory stays at one
chunk whatever the tensor size, and page-cache pages never count toward our RSS (no ``mmap``). Source
files are opened once, through ``safe_io.open_source``: a local file (read-only, regular files only,
``os.preadv``) or the object behind an object-store stand-in (ranged GETs).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.safe_io import open_source
from vllm_consolidate.source import Segment, sub_segments
from vllm_consolidate.storage.bytefile import ByteFile


class OpenFiles:
    """Source files (:class:`~vllm_consolidate.storage.bytefile.ByteFile`), opened once and shared by the
    worker threads."""

    def __init__(self) -> None:
        self._files: dict[str, ByteFile] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> ByteFile:
        with self._lock:
            if path not in self._files:
                self._files[path] = open_source(path)  # a FIFO swapped in after reading must not block
            return self._files[path]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def check_read(got: int, want: int, seg: Segment) -> None:
    if got != want:
        raise CorruptCheckpointError(
            f"file ended early: wanted {want} bytes at offset {seg.offset}, got {got}; it is probably truncated",
            path=seg.path,
        )


def read_into(files: OpenFiles, buf: memoryview, segs: Iterator[Segment]) -> None:
    pos = 0
    for seg in segs:
        got = files.get(seg.path).preadv_into(buf[pos : pos + seg.nbytes], seg.offset)
        check_read(got, seg.nbytes, seg)
        pos += seg.nbytes


_local = threading.local()


def thread_buffer(nbytes: int, slot: str = "src") -> memoryview:
    """A per-thread buffer reused across chunks, so a long run allocates nothing per chunk."""
    buf = getattr(_local, slot, None)
    if buf is None or len(buf) < nbytes:
        buf = bytearray(max(nbytes, 1))
        setattr(_local, slot, buf)
    return memoryview(buf)[:nbytes]


def iter_chunks(segments: list[Segment], chunk_bytes: int, *, buffer: bytearray | None = None,
                files: OpenFiles | None = None) -> Iterator[memoryview]:
    """A tensor's bytes (the concatenation of ``segments``) as consecutive chunks of ``chunk_bytes``.

    Each chunk is read with positional reads into one reused buffer (``buffer``, else the calling
    thread's), so a chunk is valid only until the next one is yielded; the last may be shorter.

    Args:
        segments: Where the bytes are.
        chunk_bytes: Bytes per chunk (a multiple of the item size keeps elements whole).
        buffer: Memory of at least ``chunk_bytes`` to read into; for two iterations at once.
        files: Open descriptors to share; by default the files are opened here and closed at the end.

    Raises:
        CorruptCheckpointError: A file ends before its segment does.
    """
    own = files is None
    files = OpenFiles() if files is None else files
    total = sum(seg.nbytes for seg in segments)
    try:
        for start in range(0, total, chunk_bytes):
            n = min(chunk_bytes, total - start)
            view = thread_buffer(n) if buffer is None else memoryview(buffer)[:n]
            read_into(files, view, sub_segments(segments, start, n))
            yield view
    finally:
        if own:
            files.close()


def equal_bytes(a: memoryview, b: memoryview) -> bool:
    """Whether two buffers hold the same bytes.

    numpy compares at memory speed; ``memoryview == memoryview`` unpacks element by element (~8x slower).
    numpy is imported here, not at the top: a plain byte copy never needs it.
    """
    import numpy as np

    return len(a) == len(b) and bool(np.array_equal(np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)))



__all__ = ["OpenFiles", "check_read", "equal_bytes", "iter_chunks", "read_into", "thread_buffer"]
