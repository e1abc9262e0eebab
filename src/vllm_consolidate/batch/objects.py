"""A batch over object storage: ``--input-dir``/``--input-pattern`` and ``--output-dir`` as ``s3://…`` (or gs, az).

Inputs
------
An object-store input is listed once, in the driver, into a private mirror of stand-in files
(:func:`~vllm_consolidate.storage.remote.mirror`): the batch's usual listing, checkpoint selection,
naming and metadata-only planning run on it unchanged. For ``--input-pattern`` the mirror is of the
prefix before the first segment holding a wildcard or brace, and the rest of the pattern is globbed in
it. Plans, reports and manifests name the URLs, never the stand-ins; a job is sent to its worker as
URLs, and the worker's own :func:`~vllm_consolidate.convert.convert` lists its checkpoint again in a
temporary folder of its own. A source is fingerprinted by ``[size, ETag]`` instead of size and mtime.

Outputs: where the batch state lives
------------------------------------
Each job's output is committed by convert's object-store path (staged under a sibling prefix,
validated, copied into ``<output-dir>/<name>/`` with our marker last): a failed job leaves nothing
under its output prefix. No local state is kept (only temporary folders that are removed).

* **The manifest** is one object, ``<output-dir>/.vllm-consolidate-batch.json`` (:data:`MANIFEST_KEY`),
  written by the driver only, replaced whole by a single PUT after each job that finished (so a reader
  sees the old or the new one, never half). Per output name it records what a local output's manifest
  does (source checkpoint URL, source fingerprint, content options, result) plus every committed
  object's size and ETag. Storage options are never recorded (they may hold credentials).
* **Done** means: the output prefix holds our marker, the manifest has an entry for the name with the
  same checkpoint, sources and options, and every object the entry lists is there with its size and
  ETag (so ``--verify-checksums`` adds nothing: ETags are always compared). An output with our marker
  but no matching entry (the driver died between a commit and the manifest's PUT) whose marker names
  the same source is redone and replaced; one with a marker naming another source is blocked without
  ``--force``, as locally.
* **One batch per output prefix**: the driver creates ``<output-dir>/.vllm-consolidate-batch.lock``
  (:data:`LOCK_KEY`) with a create-if-absent PUT (atomic in S3, GCS and Azure) and deletes it at the
  end. A second batch on the same prefix stops with exit 11 before touching anything. A driver killed
  with SIGKILL leaves the lock. The lock names its holder (host, kernel boot, PID namespace, PID); a
  batch that finds a lock whose holder provably died (same machine, boot and namespace, no such PID: as
  convert decides for a staging prefix) takes it over with a conditional PUT (``If-Match`` its ETag), so
  of two batches racing for a dead lock one wins and the other stops with exit 11. A lock held on
  another machine (or by a live process, or not in our format) is never taken: the message names it,
  and deleting it (once no batch runs) lets the next batch start. The store itself cannot tell a dead
  holder from a live one on another machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vllm_consolidate import __version__
from vllm_consolidate.errors import BatchError, ConsolidateError, StorageError, UsageError
from vllm_consolidate.storage import remote
from vllm_consolidate.storage.staging import read_small
from vllm_consolidate.storage.store import open_store, storage_error
from vllm_consolidate.storage.urls import ObjectURL, is_object_url, parse_object_url, relative_key
from vllm_consolidate.write import remote as rpub
from vllm_consolidate.write.publish import MARKER_NAME

MANIFEST_KEY = ".vllm-consolidate-batch.json"
MANIFEST_FORMAT = "vllm-consolidate-batch"
LOCK_KEY = ".vllm-consolidate-batch.lock"
#: The manifest is read whole; 10k jobs of ~50 files each stay far below this.
MAX_MANIFEST_BYTES = 256 * 2**20
LOCK_FORMAT = "vllm-consolidate-batch-lock"
#: A lock object is a small JSON record; a larger one is not ours and is never parsed.
MAX_LOCK_BYTES = 4096
_GLOB_CHARS = "*?[{"


def mirror_inputs(stack: contextlib.ExitStack, input_dir: Any, pattern: str | None,
                  options: dict[str, str]) -> tuple[Any, str | None]:
    """``input_dir`` and ``pattern`` with an object URL replaced by its mirror (closed with ``stack``)."""
    if input_dir is not None and is_object_url(str(input_dir)):
        input_dir = stack.enter_context(remote.mirror(parse_object_url(str(input_dir)), options)).path
    if pattern is not None and is_object_url(pattern):
        scheme, _, rest = pattern.partition("://")
        parts = rest.split("/")
        fixed = next((i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS)), len(parts))
        if fixed < 2:
            raise UsageError("--input-pattern's bucket and first prefix segment must be literal",
                             hint="e.g. s3://bucket/runs/*/qwen2.5-7b")
        base = stack.enter_context(remote.mirror(parse_object_url(f"{scheme}://{'/'.join(parts[:fixed])}"), options))
        pattern = str(base.path.joinpath(*parts[fixed:])) if fixed < len(parts) else str(base.path)
    return input_dir, pattern


def public_path(path: Any) -> str:
    """A job's path as reports and manifests name it: the URL of a stand-in, else the absolute local path."""
    return remote.public(str(Path(path).absolute()))


def _objects(store: Any, url: ObjectURL) -> dict[str, list]:
    """``{relative key: [size, ETag]}`` of every object under ``url`` (bounded as convert's own listing)."""
    import obstore

    out: dict[str, list] = {}
    try:
        for chunk in obstore.list(store, url.prefix, chunk_size=1000):
            for meta in chunk:
                out[relative_key(str(meta["path"]), url.prefix)] = [int(meta["size"]), meta.get("e_tag") or ""]
                if len(out) > remote.MAX_OBJECTS:
                    raise BatchError(f"more than {remote.MAX_OBJECTS:,} objects under an output prefix", path=str(url))
    except FileNotFoundError:
        return {}
    except ConsolidateError:
        raise
    except Exception as exc:  # noqa: BLE001 - obstore's errors
        raise storage_error(exc, url, what="listing") from exc
    return out


class ObjectOutputs:
    """``--output-dir`` as an object-store prefix: job outputs, the batch manifest and the batch lock.

    Args:
        url: The ``--output-dir`` URL.
        options: ``--storage-options`` (never recorded).
    """

    def __init__(self, url: ObjectURL, options: dict[str, str]):
        if not url.prefix:
            raise UsageError("--output-dir names a bucket, not a prefix in it", path=str(url),
                             hint=f"Name a prefix for the outputs, e.g. {url}/models.")
        self.url, self.store = url, open_store(url, options)
        raw = read_small(self.store, url.child(MANIFEST_KEY), MAX_MANIFEST_BYTES)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        ok = isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and isinstance(data.get("jobs"), dict)
        self.jobs: dict[str, dict[str, Any]] = data["jobs"] if ok else {}  # type: ignore[index]

    def output(self, name: str) -> ObjectURL:
        return self.url.child(name)

    def is_ours(self, output: ObjectURL) -> bool:
        return rpub.is_ours(self.store, output)

    def state(self, output: ObjectURL, checkpoint: str, weights: str, sources: dict[str, list],
              options: dict[str, Any]) -> tuple[str, str]:
        """As :func:`~vllm_consolidate.batch.manifest.output_state`: ``missing``, ``current``, ``stale`` or
        ``foreign``, and why (see the module docstring's "Done")."""
        found = _objects(self.store, output)
        if not found:
            return "missing", ""
        if MARKER_NAME not in found or not self.is_ours(output):
            return "foreign", "exists without a vllm-consolidate marker"
        entry = self.jobs.get(output.name)
        if not isinstance(entry, dict) or (entry.get("source") or {}).get("checkpoint") != checkpoint:
            raw = read_small(self.store, output.child(MARKER_NAME), rpub.MAX_MARKER_BYTES) or b"{}"
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(raw).get("source") == weights:
                    return "stale", "not recorded in the batch manifest"
            return "foreign", "made from another checkpoint"
        if entry.get("options") != options:
            return "stale", "options changed"
        if entry.get("source_files") != sources:
            return "stale", "source changed"
        files = entry.get("files") or {}
        for rel, seen in files.items():
            if found.get(rel) != seen:
                return "stale", f"{rel} missing or changed"
        return ("current", "") if files else ("stale", "manifest lists no files")

    def record(self, name: str, base: dict[str, Any], result: dict[str, Any]) -> None:
        """Record a finished job (its committed objects' sizes and ETags) and PUT the whole manifest."""
        output = self.output(name)
        self.jobs[name] = {**base, "files": _objects(self.store, output), "tool_version": __version__,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "result": {k: result.get(k) for k in ("status", "tensors", "parameters",
                                                                  "output_dtype", "bytes_written", "seconds")}}
        data = {"format": MANIFEST_FORMAT, "manifest_version": 1, "jobs": self.jobs}
        self._put(MANIFEST_KEY, json.dumps(data, indent=1, sort_keys=True).encode())

    def _put(self, rel: str, data: bytes, mode: str | None = None) -> None:
        import obstore

        url = self.url.child(rel)
        try:
            obstore.put(self.store, url.prefix, data, mode=mode, use_multipart=False)
        except Exception as exc:  # noqa: BLE001 - obstore's errors
            if type(exc).__name__ in ("AlreadyExistsError", "PreconditionError"):
                raise BatchError("another batch is writing to this output prefix, or a killed one left its lock",
                                 path=str(url), hint="Wait for it to finish, or use another --output-dir; if no "
                                 "batch is running, delete this object.") from None
            raise storage_error(exc, url, what="upload") from exc

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the batch lock object (create-if-absent) while the batch runs.

        Raises:
            BatchError: Another batch holds it (exit 11).
        """
        from vllm_consolidate.storage.staging import machine_identity

        holder = {"format": LOCK_FORMAT, **machine_identity(), "pid": os.getpid(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = json.dumps(holder).encode()
        try:
            self._put(LOCK_KEY, data, mode="create")
        except BatchError:
            if not self._take_dead_lock(data):
                raise
        try:
            yield
        finally:
            from vllm_consolidate.storage.staging import delete_keys

            with contextlib.suppress(Exception):
                delete_keys(self.store, self.url, [LOCK_KEY])


    def _take_dead_lock(self, data: bytes) -> bool:
        """Replace a lock whose holder provably died with ``data``, only if it is still that lock (``If-Match``).

        Returns:
            True when the lock is now ours; False when it is held (or its holder cannot be shown dead).
        """
        import obstore

        from vllm_consolidate.storage.staging import run_is_dead

        url = self.url.child(LOCK_KEY)
        try:
            got = obstore.get(self.store, url.prefix)
            if int(got.meta["size"]) > MAX_LOCK_BYTES:
                return False
            record = json.loads(bytes(got.bytes()))
            etag = got.meta.get("e_tag")
        except FileNotFoundError:  # released meanwhile: try to create it once more
            etag, record = None, {"format": LOCK_FORMAT}
        except (ValueError, UnicodeDecodeError):  # not our record: not ours to replace
            return False
        except Exception as exc:  # noqa: BLE001 - obstore's errors
            raise storage_error(exc, url, what="download") from exc
        if not isinstance(record, dict) or record.get("format") != LOCK_FORMAT:
            return False
        if etag is not None and not run_is_dead(record):
            return False
        try:
            self._put(LOCK_KEY, data, mode="create" if etag is None else {"e_tag": etag})
        except (BatchError, StorageError):  # another batch took it first, or the store has no conditional PUT
            return False
        return True


def clear_staging(output: str, options: dict[str, str]) -> None:
    """What a killed attempt at a job left beside its object-store output (its staging prefix), if provably dead."""
    from vllm_consolidate.storage.staging import clean_stale

    url = parse_object_url(output)
    with contextlib.suppress(ConsolidateError):
        clean_stale(open_store(url, options), url)


__all__ = ["LOCK_KEY", "MANIFEST_KEY", "ObjectOutputs", "clear_staging", "mirror_inputs", "public_path"]
