"""One interface for reading bytes of an input file, local or in an object store.

Every reader reads through a :class:`ByteFile`: ``size``, ``pread(n, offset)``,
``preadv_into(view, offset)``, ``advise(offset, length)`` (a read-ahead hint) and ``close()``.

* :class:`LocalFile` is a descriptor (opened by ``safe_io.open_regular``, regular files only) read
  with ``os.pread``/``os.preadv``; ``advise`` is ``posix_fadvise(WILLNEED)``.
* :class:`RemoteFile` is one object of a listed prefix, read with ranged GETs (obstore). Each GET
  carries ``If-Match`` with the ETag the listing returned, so an object replaced while we read fails
  with a clear error instead of mixing two versions. ``advise`` turns the writer's read-ahead into
  GETs started in the background: adjacent hinted ranges are coalesced (up to :data:`MAX_GET_BYTES`)
  and several run at once, so the writer's 4-16 MiB chunk reads find their bytes already fetched.
  Only hinted bytes are fetched: ranges are never widened (the Adam moments next to the fp32 masters
  in a ZeRO rank file are never requested), and object_store's own ``get_ranges`` is not used because
  it merges ranges less than 1 MiB apart, which would fetch the bytes between them.

Transient errors are retried by obstore with backoff (``store.retry_config``); a body that breaks off mid-way
is retried here a few times more.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from vllm_consolidate.errors import StorageError
from vllm_consolidate.storage.store import storage_error

#: Largest single GET the read-ahead issues (object stores serve 8-16 MiB ranges at full speed).
MAX_GET_BYTES = 16 * 2**20
#: GETs in flight at once, for all remote files together.
MAX_IN_FLIGHT = 8
#: Bytes fetched ahead and not yet read, for all remote files together; above it hints are dropped
#: (a hint is only a hint: the read then fetches its own bytes).
MAX_PREFETCH_BYTES = 256 * 2**20
BODY_RETRIES = 3
#: An object this small is fetched whole on its first read and served from memory: parsing a torch zip or a
#: pickle reads it in dozens of small pieces, each a round trip to the store (a ZeRO ``model_states`` file is
#: ~140 KB for a 0.5B model; its 80 reads became one GET). Larger objects are read exactly as asked.
SMALL_OBJECT_BYTES = 256 * 2**10


class ByteFile(Protocol):
    """A readable input file (see the module docstring)."""

    name: str
    size: int

    def pread(self, n: int, offset: int) -> bytes: ...

    def preadv_into(self, view: memoryview, offset: int) -> int: ...

    def advise(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


class LocalFile:
    """A local regular file, read with positional reads."""

    def __init__(self, fd: int, name: str):
        self.fd, self.name = fd, name
        self.size = os.fstat(fd).st_size

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def preadv_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; fewer bytes only at the end of the file."""
        got = os.preadv(self.fd, [view], offset)
        while 0 < got < len(view):  # preadv may return short on large requests
            more = os.preadv(self.fd, [view[got:]], offset + got)
            if more == 0:
                break
            got += more
        return got

    def advise(self, offset: int, length: int) -> None:
        with contextlib.suppress(OSError, AttributeError):  # a hint: without it reads happen on demand
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class RemoteObject:
    """One listed object: where it is and what the listing said about it."""

    store: Any
    key: str
    size: int
    etag: str | None
    url: str


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_budget = threading.BoundedSemaphore(MAX_PREFETCH_BYTES // 2**20)  # in MiB units, rounded up per block


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT, thread_name_prefix="vllmc-get")
        return _pool


#: Every GET: (url, start, end). Tests and the benchmark read it; a list append is cheap and thread-safe.
REQUESTS: list[tuple[str, int, int]] = []
RECORD_REQUESTS = False


def get_range(obj: RemoteObject, start: int, end: int) -> memoryview:
    """Bytes ``[start, end)`` of ``obj`` (fewer if the object is shorter), pinned to the listed ETag.

    Raises:
        InputNotFoundError: The object is gone.
        StorageError: It changed since it was listed, or the store failed after its retries.
    """
    import obstore

    from vllm_consolidate.errors import InputNotFoundError

    if RECORD_REQUESTS:
        REQUESTS.append((obj.url, start, end))
    options: dict[str, Any] = {"range": (start, end)}
    if obj.etag:
        options["if_match"] = obj.etag
    for attempt in range(BODY_RETRIES):
        try:
            return memoryview(obstore.get(obj.store, obj.key, options=options).bytes())
        except obstore.exceptions.PreconditionError as exc:
            raise StorageError("the object changed while it was being read (its ETag no longer matches the "
                               "listing)", path=obj.url,
                               hint="Wait until whatever writes the checkpoint has finished, then run again.") from exc
        except FileNotFoundError as exc:
            raise InputNotFoundError("the object disappeared while it was being read", path=obj.url) from exc
        except Exception as exc:  # noqa: BLE001 - obstore's own errors, after its retries
            if attempt + 1 == BODY_RETRIES:
                raise storage_error(exc, obj.url, what=f"GET of bytes {start}-{end}") from exc
    raise AssertionError("unreachable")


@dataclass
class _Block:
    start: int
    end: int
    future: Future
    units: int  # budget held, in MiB
    used: int = 0


class RemoteFile:
    """One object read with ranged GETs, with read-ahead driven by :meth:`advise`."""

    def __init__(self, obj: RemoteObject, name: str):
        self.obj, self.name, self.size = obj, name, obj.size
        self._lock = threading.Lock()
        self._starts: list[int] = []  # sorted block starts (blocks never overlap)
        self._blocks: dict[int, _Block] = {}
        self._pending: list[int] | None = None  # a hinted run not yet fetched: [start, end]
        self._whole: memoryview | None = None  # a small object's bytes (SMALL_OBJECT_BYTES)

    # -- read-ahead -----------------------------------------------------------------------------------
    def advise(self, offset: int, length: int) -> None:
        """Fetch ``[offset, offset + length)`` in the background; adjacent hints become one GET."""
        end = min(self.size, offset + length)
        if offset >= end:
            return
        with self._lock:
            run = self._pending
            if run is not None and run[1] == offset and end - run[0] <= MAX_GET_BYTES:
                run[1] = end
                return
            if run is not None:
                self._submit(*run)
            self._pending = None
            while end - offset > MAX_GET_BYTES:
                self._submit(offset, offset + MAX_GET_BYTES)
                offset += MAX_GET_BYTES
            self._pending = [offset, end]

    def _submit(self, start: int, end: int) -> None:
        """Start a GET of ``[start, end)`` (lock held) unless it overlaps a block or the budget is spent."""
        i = bisect.bisect_right(self._starts, start)
        if i and self._blocks[self._starts[i - 1]].end > start:
            return
        if i < len(self._starts) and self._starts[i] < end:
            return
        units = -(-(end - start) // 2**20)
        taken = 0
        while taken < units and _budget.acquire(blocking=False):
            taken += 1
        if taken < units:  # over the budget: drop the hint
            for _ in range(taken):
                _budget.release()
            return
        block = _Block(start, end, _executor().submit(get_range, self.obj, start, end), units)
        bisect.insort(self._starts, start)
        self._blocks[start] = block

    def _drop(self, block: _Block) -> None:
        """Forget a block (lock held) and give back its budget."""
        if self._blocks.pop(block.start, None) is not None:
            self._starts.remove(block.start)
            for _ in range(block.units):
                _budget.release()

    def _block_at(self, pos: int, end: int) -> tuple[_Block | None, int]:
        """The block holding ``pos`` (or None) and where the bytes from ``pos`` that it can serve end."""
        with self._lock:
            run = self._pending
            if run is not None and run[0] < end and pos < run[1]:  # about to be read: fetch it now
                self._pending = None
                self._submit(*run)
            i = bisect.bisect_right(self._starts, pos)
            if i:
                block = self._blocks[self._starts[i - 1]]
                if block.end > pos:
                    return block, min(end, block.end)
            nxt = self._starts[i] if i < len(self._starts) else end
            return None, min(end, nxt)

    # -- reads ----------------------------------------------------------------------------------------
    def preadv_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` with the bytes from ``offset``; fewer only at the end of the object."""
        end = min(self.size, offset + len(view))
        if self.size <= SMALL_OBJECT_BYTES:
            return self._read_small(view, offset, end)
        pos = offset
        while pos < end:
            block, stop = self._block_at(pos, end)
            if block is not None:
                try:
                    data = block.future.result()
                except BaseException:
                    with self._lock:
                        self._drop(block)
                    raise
                piece = data[pos - block.start: stop - block.start]
                with self._lock:
                    block.used += len(piece)
                    if block.used >= block.end - block.start:  # read whole: free it
                        self._drop(block)
            else:
                piece = get_range(self.obj, pos, stop)
            view[pos - offset: pos - offset + len(piece)] = piece
            pos += len(piece)
            if len(piece) < stop - (pos - len(piece)):  # the object is shorter than listed
                break
        return pos - offset

    def _read_small(self, view: memoryview, offset: int, end: int) -> int:
        if offset >= end:
            return 0
        with self._lock:
            if self._whole is None:
                self._whole = get_range(self.obj, 0, self.size)
            whole = self._whole
        piece = whole[offset:end]
        view[: len(piece)] = piece
        return len(piece)

    def pread(self, n: int, offset: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        buf = bytearray(n)
        got = self.preadv_into(memoryview(buf), offset) if n else 0
        return bytes(buf[:got])

    def close(self) -> None:
        with self._lock:
            self._pending, self._whole = None, None
            for block in list(self._blocks.values()):
                block.future.cancel()
                self._drop(block)


class ByteFileReader:
    """A seekable binary file object over a :class:`ByteFile` (or a window of it), for ``zipfile``.

    Every read is exactly what is asked (no read-ahead buffer): ``zipfile`` reads a 30-byte local header
    before each member, and a buffer would fetch the member data after it (for a ZeRO rank file, the Adam
    moments). :meth:`window` gives a view of bytes ``[start, start + length)`` seen as a whole file: DCP
    stores each tensor as a ``torch.save`` archive inside a larger ``.distcp``, and the zip reader must see
    that archive alone (its directory is found from the end).
    """

    def __init__(self, source: ByteFile, *, start: int = 0, length: int | None = None, owns: bool = True):
        self.source, self._start, self._pos, self._owns = source, start, 0, owns
        self.size = source.size - start if length is None else length
        self.name = source.name
        self.closed = False

    def window(self, start: int, length: int) -> ByteFileReader:
        """Bytes ``[start, start + length)`` of this reader as a file of their own (closing it closes nothing)."""
        return ByteFileReader(self.source, start=self._start + start, length=length, owns=False)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        if base + pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = base + pos
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        n = min(n, self.size - self._pos)
        data = self.source.pread(n, self._start + self._pos) if n > 0 else b""
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def fileno(self) -> int:
        import io

        raise io.UnsupportedOperation("read through positional reads only (an object-store input has no descriptor)")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._owns:
                self.source.close()

    def __enter__(self) -> ByteFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ByteFile", "ByteFileReader", "LocalFile", "MAX_GET_BYTES", "RemoteFile", "RemoteObject", "get_range"]
