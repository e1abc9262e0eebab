"""What validation reads of an object-store output, kept from the bytes as they are uploaded.

An output committed by completing open multipart uploads (:mod:`.staging`) cannot be read before the
commit: an upload that is not completed has no object to GET. So the validation's reads of a weight file
are decided before the file is written (its header and the sampled rows of every tensor, from the plan),
:class:`Kept` copies exactly those byte ranges out of the stream handed to the upload, and
:class:`StreamedView` shows the validation a private local folder whose weight files are stand-ins served
from the kept ranges (small files: real copies of the bytes held for the commit).

Why that is still a proof of what the store will hold: the observer sees each byte exactly once, in
order, in the very buffer handed to the upload (after it was accepted by obstore's writer), and the
upload is completed with nothing else: parts are uploaded in order from those bytes and the object is the
concatenation of its parts. A read the plan did not foresee is not guessed at: it raises
:class:`NotKept` (the check that made it fails, and so the validation).
"""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vllm_consolidate.posix_write import pwrite_fd
from vllm_consolidate.storage import remote

#: Kept bytes held in memory per output; the rest go to an unlinked temporary file (:class:`Spill`).
MEMORY_BYTES = 256 * 2**20


class NotKept(RuntimeError):
    """A read of an uploaded object outside the ranges kept for the validation."""


class Spill:
    """Where the kept ranges of one output live: memory up to ``memory`` bytes, then an unlinked temporary file.

    Why: a dense model keeps a few MB (three rows a tensor), but a model of tens of thousands of tensors (a
    large MoE stored per expert) or of 3-D tensors (``--moe-layout fused``: three whole matrices each) keeps
    GBs, which would break the bounded-memory promise. The file is created only when needed, never named in
    the file system (``TemporaryFile``), and closed (gone) with the output's validation. Thread-safe: the
    objects of one output are fed from the writer's threads.
    """

    def __init__(self, memory: int | None = None):
        self._left = MEMORY_BYTES if memory is None else memory
        self._fd: int | None = None
        self._size = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> bytearray | int:
        """Room for ``n`` bytes: a bytearray (memory) or an offset in the file."""
        with self._lock:
            if n <= self._left:
                self._left -= n
                return bytearray()
            if self._fd is None:
                with tempfile.TemporaryFile(prefix="vllmc-kept-") as fh:
                    self._fd = os.dup(fh.fileno())
            offset, self._size = self._size, self._size + n
            return offset

    def pwrite(self, data: Any, offset: int) -> None:
        pwrite_fd(self._fd, data, offset)  # type: ignore[arg-type]

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._fd, n, offset)  # type: ignore[arg-type]

    @property
    def spilled(self) -> int:
        """Bytes kept in the file rather than in memory."""
        return self._size

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Kept:
    """Byte ranges of one object, copied from its stream (fed in order, one contiguous piece at a time).

    Args:
        url: The object's URL (for messages).
        size: Its size.
        ranges: ``(start, end)`` byte ranges to keep (merged here; clipped to the object).
        spill: Where the bytes go (shared by the objects of one output); default: memory.
    """

    def __init__(self, url: str, size: int, ranges: Iterable[tuple[int, int]], spill: Spill | None = None):
        self.url, self.size, self.etag = url, size, None
        merged: list[list[int]] = []
        for start, end in sorted((max(0, a), min(size, b)) for a, b in ranges):
            if end <= start:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [a for a, _ in merged]
        self._ends = [b for _, b in merged]
        self._spill = spill
        # Per range: a bytearray, or the offset of its room in the spill file, and how many bytes it holds.
        self._data: list[bytearray | int] = [spill.reserve(b - a) if spill else bytearray() for a, b in merged]
        self._filled = [0] * len(merged)
        self._pos = 0
        self._next = 0  # first range not yet complete

    @property
    def nbytes(self) -> int:
        """Bytes the kept ranges hold once the object is written (what stays in memory until validation)."""
        return sum(b - a for a, b in zip(self._starts, self._ends))

    def feed(self, chunk: bytes) -> None:
        """The next contiguous piece of the object, as handed to the upload."""
        start, end = self._pos, self._pos + len(chunk)
        self._pos = end
        i = self._next
        while i < len(self._starts) and self._starts[i] < end:
            a, b = max(self._starts[i], start), min(self._ends[i], end)
            if a < b:
                piece, room = memoryview(chunk)[a - start:b - start], self._data[i]
                if isinstance(room, bytearray):
                    room += piece
                else:
                    self._spill.pwrite(piece, room + self._filled[i])  # type: ignore[union-attr]
                self._filled[i] += b - a
            if self._ends[i] > end:
                break
            i += 1
        self._next = i

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (clipped to the object).

        Raises:
            NotKept: They are not all inside one kept range (the validation read what the plan did not foresee).
        """
        end = min(end, self.size)
        if end <= start:
            return b""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or end > self._ends[i] or self._filled[i] < end - self._starts[i]:
            raise NotKept(f"{self.url}: bytes {start}-{end} were not kept from the upload for the validation")
        off, room = start - self._starts[i], self._data[i]
        if isinstance(room, bytearray):
            return bytes(room[off:off + end - start])
        return self._spill.pread(end - start, room + off)  # type: ignore[union-attr]

    def open(self) -> KeptFile:
        return KeptFile(self)


class KeptFile:
    """A :class:`~vllm_consolidate.storage.bytefile.ByteFile` over a :class:`Kept` object."""

    def __init__(self, kept: Kept):
        self.kept, self.name, self.size = kept, kept.url, kept.size

    def pread(self, n: int, offset: int) -> bytes:
        return self.kept.read(offset, offset + n)

    def preadv_into(self, view: memoryview, offset: int) -> int:
        data = self.kept.read(offset, offset + len(view))
        view[:len(data)] = data
        return len(data)

    def advise(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        pass


class StreamedView:
    """A private local folder standing for an uncommitted output, for the validation (a context manager).

    Args:
        url: The output's URL (messages name it, never the folder).
        held: Small files held in memory for the commit: written here as real files (configs, tokenizer,
            index: what transformers opens by name).
        objects: The other files by relative key: stand-ins (empty files of the object's size) read from a
            :class:`Kept` (an open upload) or by ranged GET (a :class:`~.bytefile.RemoteObject`: a staged object).
    """

    def __init__(self, url: Any, held: dict[str, bytes], objects: dict[str, Any]):
        self.root = Path(tempfile.mkdtemp(prefix="vllmc-view-")).resolve()
        self.path = self.root / url.name
        self._registered = {str(self.path / rel): obj for rel, obj in objects.items()}
        try:
            self.path.mkdir()
            for rel, data in held.items():
                (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.path / rel).write_bytes(data)
            for rel, obj in objects.items():
                (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
                with open(self.path / rel, "xb") as fh:  # noqa: PTH123 - our own private folder
                    os.truncate(fh.fileno(), obj.size)
            remote.register(self._registered, self.path, str(url))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        remote.unregister(self._registered)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> StreamedView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["MEMORY_BYTES", "Kept", "KeptFile", "NotKept", "Spill", "StreamedView"]
