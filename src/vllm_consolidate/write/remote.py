"""Publishing to an object store (``--output s3://…``, ``gs://…``, ``az://…``): :mod:`.publish`'s rules, for prefixes.

* **The input is never touched.** The output prefix may not be an input prefix, lie inside one or
  contain one (same store and bucket, compared by whole path segments: ``a/b`` is not inside ``a/bc``).
  A local input cannot overlap an object-store output.
* **Never half a model.** Every shard is a multipart upload to its final key, kept open (invisible) until
  the whole model is written and validated; small files are held in memory; the commit completes the
  uploads and PUTs the small files, the marker last (:class:`~vllm_consolidate.storage.staging.StagedOutput`).
* **Only our own outputs are replaced.** An output prefix that holds any object exists: without
  ``--force`` that is exit 6; with it, only a prefix holding our marker :data:`~.publish.MARKER_NAME`
  is replaced, and only the objects our old output listed in its marker are deleted (objects someone
  else put beside it stay). Checked before anything is written and again just before the commit.
* **S3 copies at most 5 GiB in one request** (CopyObject), so the ``--pytorch-bin`` archives of an ``s3://``
  output (staged whole, then copied: their size is unknown until written) are capped at
  :data:`S3_MAX_SHARD_BYTES`. Safetensors shards are not copied and have no such cap.

Unlike a local rename, the commit of a ``--force`` replacement is not atomic: a failure during it (the
completions, PUTs and copies) leaves the old output partly replaced. It keeps our marker, so a rerun with
``--force`` replaces it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import OutputExistsError, UnsafeInputError, UsageError
from vllm_consolidate.storage.staging import STAGING_TAG, StagedOutput, list_keys, read_small
from vllm_consolidate.storage.urls import MAX_KEY_BYTES, ObjectURL, check_relative, is_object_url, parse_object_url
from vllm_consolidate.write.publish import FILE_ROOM, MARKER_NAME, is_marker, marker_text

#: S3's CopyObject limit is 5 GiB; a staged ``.bin`` archive stays below it so that the commit copies it in one request.
S3_MAX_SHARD_BYTES = 5 * 10**9
MAX_MARKER_BYTES = 1 << 20
#: What the staging prefix adds to the output's name: ``.`` + name + tag + 16 hex digits.
STAGING_OVERHEAD = 1 + len(STAGING_TAG) + 16


def output_url(output: object) -> ObjectURL | None:
    """The object URL ``output`` names, or None for a local path."""
    return parse_object_url(output) if is_object_url(output) else None


def _inside(child: ObjectURL, parent: ObjectURL) -> bool:
    """Whether ``child`` is ``parent`` or under it (same store kind and bucket; whole path segments)."""
    if (child.kind, child.bucket) != (parent.kind, parent.bucket):
        return False
    return not parent.prefix or child.prefix == parent.prefix or child.prefix.startswith(parent.prefix + "/")


def check_output_url(output: ObjectURL, inputs: Sequence[object]) -> None:
    """Refuse an output prefix that is the bucket's root, too long, or overlaps an object-store input.

    Raises:
        UsageError: Naming what is wrong.
    """
    if not output.prefix:
        raise UsageError("--output names a bucket, not a prefix in it", path=str(output),
                         hint=f"Name a prefix for the model, e.g. {output}/my-model.")
    longest = len(output.prefix.encode()) + STAGING_OVERHEAD + 1 + FILE_ROOM
    if longest > MAX_KEY_BYTES:
        raise UsageError(f"--output's prefix is too long: with the staging name and the files inside, keys would "
                         f"reach {longest} bytes (the store takes {MAX_KEY_BYTES})", path=str(output),
                         hint="Choose a shorter --output prefix.")
    for inp in inputs:
        if not is_object_url(inp):
            continue
        src = parse_object_url(str(inp))
        if _inside(output, src):
            raise UsageError("--output is the input prefix or inside it; the input is never modified",
                             path=str(output), hint=f"Choose an output prefix outside {src}.")
        if _inside(src, output):
            raise UsageError("--output contains the input; writing (or replacing with --force) there would "
                             "destroy the input", path=str(output), hint=f"Choose an output prefix that does not "
                             f"contain {src}.")


def is_ours(store: Any, output: ObjectURL) -> bool:
    """Whether the prefix holds our marker (at most 1 MiB, our ``format``)."""
    return is_marker(read_small(store, output.child(MARKER_NAME), MAX_MARKER_BYTES))


def check_replaceable(store: Any, output: ObjectURL, force: bool) -> dict[str, int]:
    """Whether an existing output prefix may be replaced; returns its objects (``{relative key: size}``).

    Raises:
        OutputExistsError: Objects exist under it and ``force`` is off, or it holds no marker of ours.
    """
    existing = list_keys(store, output)
    if not existing:
        return existing
    if not force:
        raise OutputExistsError("output already exists (objects under this prefix)", path=str(output))
    if MARKER_NAME not in existing or not is_ours(store, output):
        raise OutputExistsError(
            f"output exists and was not written by vllm-consolidate (no {MARKER_NAME}); --force will not replace it",
            path=str(output), hint="Delete its objects yourself if they are disposable, or choose another --output.")
    return existing


def old_files(store: Any, output: ObjectURL, existing: dict[str, int]) -> list[str]:
    """The objects of our old output that ``--force`` may delete: those its marker lists, and the marker."""
    raw = read_small(store, output.child(MARKER_NAME), MAX_MARKER_BYTES)
    files = json.loads(raw).get("files") if raw else None
    listed = [MARKER_NAME] + [rel for rel in (files if isinstance(files, list) else ()) if _confined(rel)]
    return [rel for rel in listed if rel in existing]


def _confined(rel: object) -> bool:
    """A marker's file name that stays inside the prefix (a hostile marker names nothing outside it)."""
    try:
        check_relative(rel) if isinstance(rel, str) else None
    except UnsafeInputError:
        return False
    return isinstance(rel, str)


def commit(staged: StagedOutput, marker_info: dict[str, Any], force: bool, validate: Any = None) -> Any:
    """Hold the marker, validate the written output, and commit it into ``staged.output``.

    Args:
        staged: The staging prefix, holding every file of the output.
        marker_info: The marker's provenance fields.
        force: ``--force``: replace an output of ours.
        validate: Called with no argument before the commit (raising refuses it); its result is returned.

    Raises:
        OutputExistsError: The output appeared meanwhile and may not be replaced.
    """
    staged.put(MARKER_NAME, marker_text(marker_info).encode())
    report = validate() if validate is not None else None
    store, output = staged.store, staged.output
    existing = check_replaceable(store, output, force)  # again: another run may have committed meanwhile
    stale = old_files(store, output, existing) if existing else []
    # The weights go first (several at once), then one by one: an index after every shard it names,
    # config.json, and our marker last.
    index = sorted(rel for rel in staged.staged if rel.endswith(".index.json"))
    staged.commit(last=[*index, "config.json", "adapter_config.json", MARKER_NAME], existing=existing, stale=stale)
    return report


def staged_sizes(staged: StagedOutput, files: Sequence[str]) -> int:
    """Bytes of ``files`` as staged (what was uploaded)."""
    return sum(staged.staged.get(str(Path(f).as_posix()), 0) for f in files)


__all__ = ["S3_MAX_SHARD_BYTES", "check_output_url", "check_replaceable", "commit", "is_ours", "output_url",
           "staged_sizes"]
