"""Streaming one object into a store from positional writes: the writer's output when ``--output`` is ``s3://…``.

The safetensors writer fills a file with ``pwrite`` at planned offsets, from two threads, roughly in
order (chunks are submitted in offset order; a few run at once and may finish out of order). An
object can only be uploaded front to back, so :class:`ObjectSink` keeps the chunks that arrive ahead
of the first missing byte (the out-of-order window) and hands every contiguous run to obstore's
buffered writer, which uploads it as the parts of one multipart upload, a few in flight. Nothing
touches the local disk. Memory is bounded: a chunk that would grow the window past
:data:`WINDOW_BYTES` waits until the gap before it is filled (the chunk that fills the gap is always
taken, so the threads never wait on each other in a circle: jobs start in offset order), plus
:data:`MAX_CONCURRENCY` parts being uploaded. An observer may see each contiguous piece as it is handed
to the upload (the NaN/Inf scan of the validation, so that it needs no second download of the object).

Only a complete object is ever visible: the upload completes in :meth:`ObjectSink.complete` (called by
the commit, :mod:`.staging`, after :meth:`ObjectSink.finish` checked every byte was written and the
output was validated; :meth:`ObjectSink.close` does both at once), and :meth:`ObjectSink.abort` (any
failure, Ctrl-C, SIGTERM) aborts it, so no part stays billed in the bucket. Until it completes, an
upload of known size holds less than :data:`MAX_PARTS` bytes in memory (:func:`exact_part_size`); its
last parts (at most :data:`MAX_CONCURRENCY`) may still be in flight when the next file starts, as
obstore's writer does not wait for them before its close. A SIGKILL cannot abort: the open upload stays
invisible, and a bucket lifecycle rule (``AbortIncompleteMultipartUpload``) removes the parts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from vllm_consolidate.errors import StorageError
from vllm_consolidate.storage.store import storage_error
from vllm_consolidate.storage.urls import ObjectURL

#: S3's multipart rules: every part but the last at least 5 MiB, at most 10,000 parts (GCS and Azure allow more).
MIN_PART_BYTES = 5 * 2**20
MAX_PARTS = 10_000
#: Our part size unless the object is too large for it (then the smallest size within :data:`MAX_PARTS`).
PART_BYTES = 16 * 2**20
#: Parts uploaded at once, each holding its bytes until the server has them.
MAX_CONCURRENCY = 4
#: Bytes held ahead of the first missing byte before a writer waits (4 of the writer's 16 MiB chunks).
WINDOW_BYTES = 64 * 2**20


def part_size(size: int) -> int:
    """The part size for an object of about ``size`` bytes (unknown exactly): :data:`PART_BYTES`, or more to stay
    within :data:`MAX_PARTS` (a few parts short of the limit, rounded up to a MiB)."""
    need = -(-size // (MAX_PARTS - 16))
    return max(PART_BYTES, MIN_PART_BYTES, -(-need // 2**20) * 2**20)


def exact_part_size(size: int) -> int:
    """The part size for an object of exactly ``size`` bytes whose upload stays open until the commit.

    obstore's writer uploads a part each time exactly ``buffer_size`` bytes are buffered and keeps only the
    rest until it is closed. With ``n = ceil(size / PART_BYTES)`` parts (at most ``MAX_PARTS - 1``, so the rest
    fits as one more) of ``size // n`` bytes, the rest is ``size % n < n`` bytes: what an open upload holds in
    memory until the commit is below :data:`MAX_PARTS` bytes, whatever the file's size. Parts are at most
    :data:`PART_BYTES` (for files up to ~160 GB) and at least :data:`MIN_PART_BYTES` (S3's minimum; fewer, larger
    parts if need be); a file below that is one part (the last part may be any size).
    """
    n = max(1, min(-(-size // PART_BYTES), size // MIN_PART_BYTES, MAX_PARTS - 1))
    return max(1, size // n)


class ObjectSink:
    """One object being uploaded: positional writes in, one multipart upload out.

    Thread-safe. Every byte of ``[0, size)`` must be written exactly once; :meth:`close` completes the
    upload, :meth:`abort` (or :meth:`fail`, from another thread) discards it.

    Args:
        store: The obstore client of the bucket.
        url: The object (for messages).
        size: The object's final size, known from the plan; sets the part size. None for a sequential
            writer of unknown size (``size_hint`` then sets the part size).
        window: Bytes kept ahead of the first missing byte before a writer waits.
        size_hint: About how large an object of unknown size may grow.
        observe: Called with every contiguous piece of the object, in order, as it is handed to the upload
            (one call at a time): what validation needs of the bytes is computed as they stream, with no
            second download. It must not raise.
    """

    def __init__(self, store: Any, url: ObjectURL, size: int | None, *, window: int = WINDOW_BYTES,
                 size_hint: int = 0, observe: Callable[[bytes], None] | None = None):
        import obstore

        self.url, self.size, self.window, self._observe = url, size, window, observe
        self.part = exact_part_size(size) if size is not None else part_size(size_hint)
        self._writer = obstore.open_writer(store, url.prefix, buffer_size=self.part, max_concurrency=MAX_CONCURRENCY)
        self._cond = threading.Condition()
        self._upload_lock = threading.Lock()  # one thread at a time appends, in order
        self._pending: dict[int, bytes] = {}  # offset -> chunk, ahead of ``_next``
        self._buffered = 0
        self._next = 0  # first byte not yet handed to the upload
        self._failed: BaseException | None = None
        self._state = "open"

    @property
    def written(self) -> int:
        """Bytes handed to the upload so far (a prefix of the object)."""
        return self._next

    def pwrite(self, data: Any, offset: int) -> int:
        """Write ``data`` at ``offset`` (copied: the caller may reuse its buffer); returns its length.

        Raises:
            StorageError: The upload failed (here or in another thread's write).
            RuntimeError: A write outside the object or over bytes already written (a bug of the caller).
        """
        n = len(data)
        if n == 0:
            return 0
        if offset < 0 or (self.size is not None and offset + n > self.size):
            raise RuntimeError(f"write of {n} bytes at {offset} is outside {self.url} ({self.size} bytes)")
        chunk = bytes(data)
        with self._cond:
            while True:
                self._raise_if_failed()
                if offset < self._next or offset in self._pending:
                    raise RuntimeError(f"{self.url}: bytes at {offset} written twice")
                if offset == self._next or self._buffered + n <= self.window:
                    break
                self._cond.wait()
            self._pending[offset] = chunk
            self._buffered += n
        self._upload_ready()
        return n

    def write(self, data: Any) -> int:
        """Append ``data`` (a sequential writer: assets, ``.bin`` files)."""
        return self.pwrite(data, self._next + self._buffered)

    def _upload_ready(self) -> None:
        """Hand every chunk that continues the uploaded prefix to the upload, in order."""
        with self._upload_lock:
            while True:
                with self._cond:
                    self._raise_if_failed()
                    chunk = self._pending.pop(self._next, None)
                if chunk is None:
                    return
                try:
                    self._writer.write(chunk)  # blocks while MAX_CONCURRENCY parts are in flight
                except Exception as exc:
                    self.fail(storage_error(exc, self.url, what="upload"))
                    raise self._failed from exc  # type: ignore[misc]
                if self._observe is not None:
                    self._observe(chunk)
                with self._cond:
                    self._next += len(chunk)
                    self._buffered -= len(chunk)
                    self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            if isinstance(self._failed, StorageError):
                raise self._failed
            raise StorageError(f"upload abandoned: {type(self._failed).__name__}", path=str(self.url))

    def fail(self, exc: BaseException | None = None) -> None:
        """Make every waiting and later write raise (another writer thread failed); :meth:`abort` still follows."""
        with self._cond:
            if self._failed is None:
                self._failed = exc or StorageError("upload abandoned", path=str(self.url))
            self._cond.notify_all()

    @property
    def held(self) -> int:
        """Bytes handed to the upload that no part has taken yet (obstore's writer holds them until a part is full,
        or until :meth:`complete`)."""
        return self._next % self.part

    def finish(self) -> None:
        """Check that every byte was written, and keep the upload open (invisible) for :meth:`complete`.

        Raises:
            RuntimeError: Not every byte was written (a bug of the caller); the upload is aborted.
        """
        with self._upload_lock, self._cond:
            if self._pending or (self.size is not None and self._next != self.size):
                missing = (self.size or 0) - self._next
                self._state = "closing"
                self._abort_writer()
                raise RuntimeError(f"{self.url}: {missing} of {self.size} bytes were never written")
            self._state = "written"

    def close(self) -> None:
        """:meth:`finish`, then :meth:`complete`."""
        self.finish()
        self.complete()

    def complete(self) -> None:
        """Complete the upload: its last bytes are uploaded and the object appears.

        Raises:
            StorageError: The store refused to complete it.
        """
        with self._upload_lock, self._cond:
            if self._state != "written":
                raise RuntimeError(f"{self.url}: completed in state {self._state}")
            self._state = "closed"
        try:
            self._writer.close()
        except Exception as exc:
            raise storage_error(exc, self.url, what="upload") from exc

    def abort(self) -> None:
        """Abort the upload (its parts are deleted); safe to call twice, and after :meth:`close` failed."""
        self.fail()
        with self._upload_lock, self._cond:
            self._pending.clear()
            if self._state in ("open", "written"):
                self._state = "aborted"
                self._abort_writer()

    def _abort_writer(self) -> None:
        # Through the context-manager exit with an exception: obstore's one way to abort (AbortMultipartUpload).
        try:
            self._writer.__exit__(RuntimeError, RuntimeError("abort"), None)
        except Exception:  # noqa: BLE001 - already failing; a part left behind is the lifecycle rule's
            pass


__all__ = ["MAX_CONCURRENCY", "PART_BYTES", "WINDOW_BYTES", "ObjectSink", "exact_part_size", "part_size"]
