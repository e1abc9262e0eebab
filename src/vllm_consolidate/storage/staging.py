"""Staging an output in an object store, then committing it: never half a model under the output prefix.

An object store has no folder to rename, so an output is written under a sibling staging prefix
``<parent>/.<name>.vllmc-staging-<id>/`` (``<id>``: 16 random hex digits, so the prefix is ours alone)
and, once complete and validated, committed by server-side copy into ``<output>/``: the other objects
first, :data:`COPIES_IN_FLIGHT` at a time (a server copies a multi-GB shard at its own pace), then the
objects the caller names last (an index, ``config.json``, then our marker), one by one, in that order: a
reader that waits for the marker sees a whole model. Then the staging objects are deleted.

On any failure, Ctrl-C or SIGTERM (:meth:`StagedOutput.discard`) every open multipart upload is
aborted and every staged object deleted; a failure during the commit also deletes the copies it had
made that replaced nothing. A SIGKILL cannot clean up: what it leaves is under the staging prefix (and
open multipart uploads there), never under the output; the first object staged, :data:`RECORD_NAME`,
names the output and the run, so the next run for the same output on the same machine deletes it once
that run is provably dead (:func:`clean_stale`).

Nothing here reads or deletes anything outside the staging prefix and the output prefix; the caller
checks the output prefix against the input first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from vllm_consolidate.errors import ConsolidateError, StorageError
from vllm_consolidate.storage.store import storage_error
from vllm_consolidate.storage.upload import ObjectSink
from vllm_consolidate.storage.urls import ObjectURL, relative_key

STAGING_TAG = ".vllmc-staging-"
ID_HEX = 16
#: The run record, staged first and never committed.
RECORD_NAME = ".vllm-consolidate.staging.json"
RECORD_FORMAT = "vllm-consolidate-staging"
#: Server-side copies in flight during a commit (each a whole object; S3 copies several at once faster).
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
    of another machine's run is left alone (it may be running). Multipart uploads such a run left open
    cannot be listed through obstore; a bucket lifecycle rule (``AbortIncompleteMultipartUpload``) ends them.

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


class StagedOutput:
    """The staging prefix of one conversion into ``output``.

    Use as a context manager: on any exception the uploads are aborted and the staged objects deleted
    (:meth:`discard`); :meth:`commit` copies them into the output.
    """

    def __init__(self, store: Any, output: ObjectURL):
        self.store, self.output = store, output
        self.url = output.sibling(f".{output.name}{STAGING_TAG}{uuid.uuid4().hex[:ID_HEX]}")
        self.staged: dict[str, int] = {}  # relative key -> size, in the order staged
        self._sinks: list[ObjectSink] = []
        self._lock = threading.Lock()
        #: Given a relative key, what to call with the object's bytes as they stream (see ObjectSink), or None.
        self.observe: Callable[[str], Callable[[bytes], None] | None] | None = None

    def __enter__(self) -> StagedOutput:
        record = {"format": RECORD_FORMAT, "output": str(self.output), **machine_identity(), "pid": os.getpid(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._put(RECORD_NAME, json.dumps(record).encode())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

    @contextlib.contextmanager
    def sink(self, rel: str, size: int | None, *, size_hint: int = 0) -> Iterator[ObjectSink]:
        """An :class:`ObjectSink` for ``rel``: completed when the block ends, aborted if it raises."""
        observe = self.observe(rel) if self.observe is not None else None
        sink = ObjectSink(self.store, self.url.child(rel), size, size_hint=size_hint, observe=observe)
        with self._lock:
            self._sinks.append(sink)
        try:
            yield sink
            sink.close()
        except BaseException:
            sink.abort()
            raise
        with self._lock:
            self.staged[rel] = sink.written

    def put(self, rel: str, data: bytes) -> None:
        """Stage a small object in one request."""
        self._put(rel, data)
        with self._lock:
            self.staged[rel] = len(data)

    def _put(self, rel: str, data: bytes) -> None:
        import obstore

        url = self.url.child(rel)
        try:
            obstore.put(self.store, url.prefix, data, use_multipart=False)
        except Exception as exc:
            raise storage_error(exc, url, what="upload") from exc

    def commit(self, last: Sequence[str], existing: Iterable[str] = (), stale: Iterable[str] = ()) -> None:
        """Copy every staged object into the output, ``last`` in that order at the end; then delete the staging.

        Args:
            last: Relative keys to copy after all others, in this order (config.json, the marker).
            existing: Relative keys already in the output (a ``--force`` replacement): a failed commit
                deletes only the copies that were not among them.
            stale: Keys of the old output the new one does not overwrite, deleted after the commit.
        """
        rank = {rel: i + 1 for i, rel in enumerate(last)}
        order = sorted(self.staged, key=lambda rel: rank.get(rel, 0))  # stable: the rest keep their order
        before = set(existing)
        copied: list[str] = []
        try:
            # The weights and other files first, several copies in flight (a server copies each at its own pace,
            # GBs for a shard); then config.json and the marker, one by one, in order, once all those are there.
            self._copy_all([rel for rel in order if rel not in rank], copied)
            for rel in [rel for rel in order if rel in rank]:
                self._copy(rel)
                copied.append(rel)
        except BaseException:
            with contextlib.suppress(Exception):
                delete_keys(self.store, self.output, [rel for rel in copied if rel not in before])
            raise
        delete_keys(self.store, self.output, [rel for rel in stale if rel not in self.staged])
        self.discard()

    def _copy(self, rel: str) -> None:
        import obstore

        try:
            obstore.copy(self.store, self.url.key(rel), self.output.key(rel))
        except Exception as exc:
            raise storage_error(exc, self.output.child(rel), what="server-side copy") from exc

    def _copy_all(self, rels: list[str], copied: list[str]) -> None:
        """Copy ``rels``, :data:`COPIES_IN_FLIGHT` at a time; ``copied`` gets each one done (also when one fails).

        Returns only when no copy is in flight any more, so a failed commit's cleanup sees every copy made.
        """
        pool = ThreadPoolExecutor(max_workers=max(1, min(COPIES_IN_FLIGHT, len(rels))), thread_name_prefix="vllmc-copy")
        futures = {pool.submit(self._copy, rel): rel for rel in rels}
        try:
            for future in as_completed(futures):
                if future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
        finally:  # also on Ctrl-C/SIGTERM while waiting: start no new copy, wait for those running, record them
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)
            copied.extend(rel for f, rel in futures.items() if f.done() and not f.cancelled() and f.exception() is None)

    def discard(self) -> None:
        """Abort every open upload and delete everything under the staging prefix (it is this run's alone)."""
        with self._lock:
            sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.abort()
        with contextlib.suppress(Exception):  # already failing: the original error is the one to report
            delete_keys(self.store, self.url, [*self.staged, RECORD_NAME])
            delete_keys(self.store, self.url, list_keys(self.store, self.url))
        self.staged.clear()


__all__ = ["RECORD_NAME", "STAGING_TAG", "StagedOutput", "clean_stale", "delete_keys", "list_keys", "machine_identity",
           "object_exists", "read_small", "run_is_dead"]
