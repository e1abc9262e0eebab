"""Staging an output in an object store, then committing it: never half a model under the output prefix.

An object store has no folder to rename, so an output is written under a sibling staging prefix
``<parent>/.<name>.vllmc-staging-<id>/`` (``<id>``: 16 random hex digits, so the prefix is ours alone)
and, once complete and validated, committed by server-side copy into ``<output>/``, the objects the
caller names last (``config.json``, then our marker) last: a reader that waits for the marker sees a
whole model. Then the staging objects are deleted.

On any failure, Ctrl-C or SIGTERM (:meth:`StagedOutput.discard`) every open multipart upload is
aborted and every staged object deleted; a failure during the commit also deletes the copies it had
made that replaced nothing. A SIGKILL cannot clean up: what it leaves is under the staging prefix (and
open multipart uploads there), never under the output; the first object staged, :data:`RECORD_NAME`,
names the output and the run, so such a prefix can be proven ours.

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
from collections.abc import Iterable, Iterator, Sequence
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

    def __enter__(self) -> StagedOutput:
        record = {"format": RECORD_FORMAT, "output": str(self.output), "host": socket.gethostname(),
                  "pid": os.getpid(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._put(RECORD_NAME, json.dumps(record).encode())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

    @contextlib.contextmanager
    def sink(self, rel: str, size: int | None, *, size_hint: int = 0) -> Iterator[ObjectSink]:
        """An :class:`ObjectSink` for ``rel``: completed when the block ends, aborted if it raises."""
        sink = ObjectSink(self.store, self.url.child(rel), size, size_hint=size_hint)
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
        import obstore

        rank = {rel: i + 1 for i, rel in enumerate(last)}
        order = sorted(self.staged, key=lambda rel: rank.get(rel, 0))  # stable: the rest keep their order
        before = set(existing)
        copied: list[str] = []
        try:
            for rel in order:
                try:
                    obstore.copy(self.store, self.url.key(rel), self.output.key(rel))
                except Exception as exc:
                    raise storage_error(exc, self.output.child(rel), what="server-side copy") from exc
                copied.append(rel)
        except BaseException:
            with contextlib.suppress(Exception):
                delete_keys(self.store, self.output, [rel for rel in copied if rel not in before])
            raise
        delete_keys(self.store, self.output, [rel for rel in stale if rel not in self.staged])
        self.discard()

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


__all__ = ["RECORD_NAME", "STAGING_TAG", "StagedOutput", "delete_keys", "list_keys", "object_exists", "read_small"]
