"""Writing an output into an object store, then committing it: never half a model under the output prefix.

An object store has no folder to rename. What it has: a multipart upload (S3, GCS's XML API) or a block
blob's uncommitted blocks (Azure: Put Block, then Put Block List) is invisible until it is completed: not
listed, HEAD and GET 404. So each weight file of known size is streamed as one multipart upload straight
to its final key under ``<output>/`` and kept open after its last byte; small files (config, tokenizer,
index, our marker) are held in memory. Once the whole model is written and validated, :meth:`StagedOutput.commit`
completes the uploads, :data:`COPIES_IN_FLIGHT` at a time, PUTs the held files, then the objects the caller
names last (an index, ``config.json``, then our marker), one by one, in that order: a reader that waits for
the marker sees a whole model. No byte is copied by the server. (A file of unknown size, ``--pytorch-bin``'s
archives, is still uploaded whole under the staging prefix below and committed by server-side copy.)

On any failure, Ctrl-C or SIGTERM (:meth:`StagedOutput.discard`) every open upload is aborted (nothing of
it ever became visible) and every staged object deleted; a failure during the commit also deletes the
objects it had completed that replaced nothing. A SIGKILL cannot clean up: it leaves open uploads at the
output's keys, which are invisible (nothing is listed under the output) and which a bucket lifecycle rule
``AbortIncompleteMultipartUpload`` removes (Azure drops uncommitted blocks after 7 days), and a sibling
staging prefix ``<parent>/.<name>.vllmc-staging-<id>/`` (``<id>``: 16 random hex digits, so the prefix is
ours alone) holding the run record :data:`RECORD_NAME` (written first: it names the output and the run)
and any staged archive. The next run for the same output on the same machine deletes that prefix once the
run is provably dead (:func:`clean_stale`).

Nothing here reads or deletes anything outside the staging prefix and the output prefix; the caller
checks the output prefix against the input first.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from vllm_consolidate.errors import ConsolidateError, StorageError
from vllm_consolidate.storage.store import storage_error
from vllm_consolidate.storage.streamed import Kept, Spill
from vllm_consolidate.storage.upload import ObjectSink
from vllm_consolidate.storage.urls import ObjectURL, relative_key

STAGING_TAG = ".vllmc-staging-"
ID_HEX = 16
#: The run record, staged first and never committed.
RECORD_NAME = ".vllm-consolidate.staging.json"
RECORD_FORMAT = "vllm-consolidate-staging"
#: Commit steps in flight at once (completions, PUTs, copies; a server finishes each at its own pace).
COPIES_IN_FLIGHT = 4
#: Objects one listing may return before we stop (an output is a few dozen files).
MAX_LISTED = 100_000


def list_keys(store: Any, prefix: ObjectURL, *, limit: int = MAX_LISTED) -> dict[str, int]:
    """Every object under ``prefix/`` as ``{relative key: size}`` (keys confined to the prefix).

    Raises:
        StorageError: The listing failed, or holds more than ``limit`` objects.
    """
    import obstore

    out: dict[str, int] = {}
    try:
        for batch in obstore.list(store, prefix=prefix.prefix or None, chunk_size=1000):
            for meta in batch:
                out[relative_key(meta["path"], prefix.prefix)] = int(meta["size"])
                if len(out) > limit:
                    raise StorageError(f"more than {limit:,} objects under the prefix", path=str(prefix))
    except FileNotFoundError:
        return {}
    except ConsolidateError:
        raise
    except Exception as exc:
        raise storage_error(exc, prefix, what="listing") from exc
    return out


def object_exists(store: Any, url: ObjectURL) -> bool:
    """Whether an object has exactly the key ``url.prefix``."""
    import obstore

    try:
        obstore.head(store, url.prefix)
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise storage_error(exc, url, what="HEAD") from exc
    return True


def read_small(store: Any, url: ObjectURL, limit: int) -> bytes | None:
    """The bytes of a small object, or None if it is missing or larger than ``limit``."""
    import obstore

    try:
        size = int(obstore.head(store, url.prefix)["size"])
        if size > limit:
            return None
        return bytes(obstore.get_range(store, url.prefix, start=0, length=size)) if size else b""
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise storage_error(exc, url, what="GET") from exc


def delete_keys(store: Any, url: ObjectURL, rels: Iterable[str]) -> None:
    """Delete ``url/<rel>`` for each ``rel`` (a missing one is not an error)."""
    import obstore

    keys = [url.key(rel) for rel in rels]
    if keys:
        try:
            obstore.delete(store, keys)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise storage_error(exc, url, what="delete") from exc


def machine_identity() -> dict[str, str]:
    """Where this process runs: host name, kernel boot and PID namespace (a PID means one process only in them)."""
    import socket  # object-store outputs only: 3 ms of every local conversion's start otherwise

    def read(path: str, link: bool = False) -> str:
        try:
            return os.readlink(path) if link else open(path).read().strip()  # noqa: SIM115 - tiny /proc files
        except OSError:
            return ""
    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": read("/proc/self/ns/pid", link=True)}


def run_is_dead(record: dict[str, Any]) -> bool:
    """Whether the run that wrote ``record`` is provably gone: same machine, boot and PID namespace, no such PID."""
    here = machine_identity()
    if not here["boot_id"] or any(record.get(k) != v for k, v in here.items()):
        return False  # another machine (or we cannot tell): its run may be alive
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def clean_stale(store: Any, output: ObjectURL) -> list[ObjectURL]:
    """Delete the staging prefixes that killed runs (SIGKILL) left beside ``output``, and only those.

    A prefix is removed only if its name is ``.<name>.vllmc-staging-<16 hex>``, its run record names this
    very output, and that run provably died (:func:`run_is_dead`: on this machine, its PID gone). A staging prefix
    of another machine's run is left alone (it may be running). The multipart uploads such a run left open (at
    the output's own keys, invisible) cannot be listed through obstore; a bucket lifecycle rule
    (``AbortIncompleteMultipartUpload``) ends them.

    Returns:
        The prefixes deleted.
    """
    import obstore

    parent = output.prefix.rpartition("/")[0]
    head = f".{output.name}{STAGING_TAG}"
    try:
        listing = obstore.list_with_delimiter(store, parent or None)
    except Exception as exc:
        raise storage_error(exc, output, what="listing") from exc
    removed = []
    for common in listing.get("common_prefixes", []):
        name = common.rstrip("/").rpartition("/")[2]
        tail = name[len(head):]
        if not name.startswith(head) or len(tail) != ID_HEX or any(c not in "0123456789abcdef" for c in tail):
            continue
        staging = output.sibling(name)
        try:
            record = json.loads(read_small(store, staging.child(RECORD_NAME), 4096) or b"null")
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("format") == RECORD_FORMAT and \
                record.get("output") == str(output) and run_is_dead(record):
            delete_keys(store, staging, list_keys(store, staging))
            removed.append(staging)
    return removed


class _HeldSink:
    """A small file written sequentially (config, tokenizer, chat template), held in memory until the commit.

    Bounded by the caller: every asset is copied with its own cap (``read.assets.asset_limit``)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: Any) -> int:
        self.data += data
        return len(data)


class StagedOutput:
    """One conversion into ``output``, invisible until :meth:`commit`.

    Use as a context manager: on any exception the uploads are aborted and the staged objects deleted
    (:meth:`discard`). How each file travels:

    * a file of known size (a safetensors shard): one multipart upload straight to its final key, kept open
      (invisible: not listed, HEAD 404) after its last byte, completed by :meth:`commit`; obstore holds
      less than :data:`~.upload.MAX_PARTS` bytes of it until then (:func:`~.upload.exact_part_size`);
    * a small file (config, tokenizer, index, marker): held in memory, PUT by :meth:`commit`;
    * a file of unknown size (``--pytorch-bin``'s archives): uploaded whole under the staging prefix and
      committed by server-side copy, as each such file would otherwise hold up to a part until the commit.

    ``keep``, if set, names the byte ranges of a known-size file the validation will read (:mod:`.streamed`):
    they are copied out of its stream into :attr:`kept` (memory up to :data:`~.streamed.MEMORY_BYTES` for
    the whole output, then an unlinked temporary file: :class:`~.streamed.Spill`).
    """

    def __init__(self, store: Any, output: ObjectURL):
        self.store, self.output = store, output
        self.url = output.sibling(f".{output.name}{STAGING_TAG}{uuid.uuid4().hex[:ID_HEX]}")
        self.staged: dict[str, int] = {}  # relative key -> size, every file of the output in the order written
        self.held: dict[str, bytes] = {}  # small files, PUT at the commit
        self.kept: dict[str, Kept] = {}  # what the validation reads of each open upload
        self._open: dict[str, ObjectSink] = {}  # written, completed at the commit
        self._copies: set[str] = set()  # complete objects under the staging prefix, copied at the commit
        self._sinks: list[ObjectSink] = []
        self._lock = threading.Lock()
        #: Given a relative key, what to call with the object's bytes as they stream (see ObjectSink), or None.
        self.observe: Callable[[str], Callable[[bytes], None] | None] | None = None
        #: Given a relative key and its size, the byte ranges to keep for the validation.
        self.keep: Callable[[str, int], list[tuple[int, int]]] | None = None
        self.spill = Spill()

    def __enter__(self) -> StagedOutput:
        record = {"format": RECORD_FORMAT, "output": str(self.output), **machine_identity(), "pid": os.getpid(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._put(self.url, RECORD_NAME, json.dumps(record).encode())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._open or self.held:  # a failure, or a block left without its commit
            self.discard()

    @contextlib.contextmanager
    def sink(self, rel: str, size: int | None, *, size_hint: int = 0) -> Iterator[Any]:
        """Where to write ``rel``: an open upload (``size`` known), a held buffer (no size, no hint: a small
        file) or a staged upload (``size_hint``); aborted if the block raises."""
        if size is None and not size_hint:
            held = _HeldSink()
            yield held
            with self._lock:
                self.held[rel] = bytes(held.data)
                self.staged[rel] = len(held.data)
            return
        left_open = size is not None
        sink = ObjectSink(self.store, (self.output if left_open else self.url).child(rel), size,
                          size_hint=size_hint, observe=self._observer(rel, size))
        with self._lock:
            self._sinks.append(sink)
        try:
            yield sink
            if left_open:
                sink.finish()
            else:
                sink.close()
        except BaseException:
            sink.abort()
            raise
        with self._lock:
            self.staged[rel] = sink.written
            if left_open:
                self._open[rel] = sink
            else:
                self._copies.add(rel)

    def _observer(self, rel: str, size: int | None) -> Callable[[bytes], None] | None:
        """The scan of ``observe`` and, for an open upload, the :class:`Kept` ranges, fed with each piece."""
        feeds = [f for f in [self.observe(rel) if self.observe is not None else None] if f is not None]
        if size is not None and self.keep is not None:
            kept = self.kept[rel] = Kept(str(self.output.child(rel)), size, self.keep(rel, size), self.spill)
            feeds.append(kept.feed)
        if len(feeds) <= 1:
            return feeds[0] if feeds else None

        def feed(chunk: bytes) -> None:
            for f in feeds:
                f(chunk)
        return feed

    def put(self, rel: str, data: bytes) -> None:
        """A small file, held in memory and PUT at the commit."""
        with self._lock:
            self.held[rel] = bytes(data)
            self.staged[rel] = len(data)

    def _put(self, prefix: ObjectURL, rel: str, data: bytes) -> None:
        import obstore

        url = prefix.child(rel)
        try:
            obstore.put(self.store, url.prefix, data, use_multipart=False)
        except Exception as exc:
            raise storage_error(exc, url, what="upload") from exc

    def commit(self, last: Sequence[str], existing: Iterable[str] = (), stale: Iterable[str] = ()) -> None:
        """Make every file appear under the output, ``last`` in that order at the end; then delete the staging.

        The open uploads are completed, the held files PUT and the staged ones copied: all but ``last``
        :data:`COPIES_IN_FLIGHT` at a time, then ``last`` one by one.

        Args:
            last: Relative keys to commit after all others, in this order (config.json, the marker).
            existing: Relative keys already in the output (a ``--force`` replacement): a failed commit
                deletes only the objects it made that were not among them (the open uploads are aborted).
            stale: Keys of the old output the new one does not overwrite, deleted after the commit.
        """
        rank = {rel: i + 1 for i, rel in enumerate(last)}
        order = sorted(self.staged, key=lambda rel: rank.get(rel, 0))  # stable: the rest keep their order
        before = set(existing)
        done: list[str] = []
        try:
            # The weights and other files first, several in flight (a copy or a completion takes a server its
            # own time); then the index, config.json and the marker, one by one, in order, once all those are there.
            self._commit_all([rel for rel in order if rel not in rank], done)
            for rel in [rel for rel in order if rel in rank]:
                self._commit_one(rel)
                done.append(rel)
        except BaseException:
            with contextlib.suppress(Exception):
                delete_keys(self.store, self.output, [rel for rel in done if rel not in before])
            raise
        delete_keys(self.store, self.output, [rel for rel in stale if rel not in self.staged])
        self.discard()

    def _commit_one(self, rel: str) -> None:
        import obstore

        if rel in self._open:
            self._open[rel].complete()
        elif rel in self.held:
            self._put(self.output, rel, self.held[rel])
        else:
            try:
                obstore.copy(self.store, self.url.key(rel), self.output.key(rel))
            except Exception as exc:
                raise storage_error(exc, self.output.child(rel), what="server-side copy") from exc

    def _commit_all(self, rels: list[str], done: list[str]) -> None:
        """Commit ``rels``, :data:`COPIES_IN_FLIGHT` at a time; ``done`` gets each one done (also when one fails).

        Returns only when nothing is in flight any more, so a failed commit's cleanup sees every object made.
        """
        pool = ThreadPoolExecutor(max_workers=max(1, min(COPIES_IN_FLIGHT, len(rels))),
                                  thread_name_prefix="vllmc-commit")
        futures = {pool.submit(self._commit_one, rel): rel for rel in rels}
        try:
            for future in as_completed(futures):
                if future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
        finally:  # also on Ctrl-C/SIGTERM while waiting: start nothing new, wait for those running, record them
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)
            done.extend(rel for f, rel in futures.items() if f.done() and not f.cancelled() and f.exception() is None)

    def discard(self) -> None:
        """Abort every open upload, drop the held files, and delete everything under the staging prefix (ours)."""
        with self._lock:
            sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.abort()
        with contextlib.suppress(Exception):  # already failing: the original error is the one to report
            delete_keys(self.store, self.url, [*self._copies, RECORD_NAME])
            delete_keys(self.store, self.url, list_keys(self.store, self.url))
        self.staged.clear()
        self.held.clear()
        self.kept.clear()
        self.spill.close()
        self._open.clear()
        self._copies.clear()


__all__ = ["RECORD_NAME", "STAGING_TAG", "StagedOutput", "clean_stale", "delete_keys", "list_keys", "machine_identity",
           "object_exists", "read_small", "run_is_dead"]
