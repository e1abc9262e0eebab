"""Removing what killed conversions left, and only that: the one cleaner of ``convert`` and ``batch``.

A conversion killed with SIGKILL cannot clean up after itself, so the next one for the same output
does (:func:`clean_stale`), and a batch does it for a job whose worker died (:func:`discard`). What it
may remove is decided by what the folder *is*, never by its name alone (a name is easy to copy: a
user's backup, or the input itself, can be called ``.out.partial-abcdef12``):

* a temporary folder ``.<name>.partial-ID`` only if its lock file is ours (it names the output) and
  no live process holds it, or, without a lock file, if it holds our marker;
* a backup ``.<name>.old-ID`` only if it holds our marker; it is put back when the output is missing
  (a kill between :func:`~vllm_consolidate.write.publish.publish`'s two renames);
* a batch job's staging folder ``.<name>.batch-ID`` only if it holds our marker, and only when the
  batch asks (it holds the batch lock that its workers share);
* never a folder that is, holds, or lies inside an input (:func:`~vllm_consolidate.write.publish.is_within`:
  by resolved path and by device and inode).

All of it runs under :func:`~vllm_consolidate.write.publish.folder_lock`, which creating and publishing
a temporary folder also hold, so a live conversion is never caught between two of its steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from vllm_consolidate.write.publish import (
    ID_LEN,
    LOCK_NAME,
    OLD_TAG,
    PARTIAL_TAG,
    STAGING_FORMAT,
    folder_lock,
    is_ours,
    is_within,
)


def _is_id(text: str) -> bool:
    return len(text) == ID_LEN and all(c in "0123456789abcdef" for c in text)


def _leftover_kind(name: str, output_name: str, staging_tags: Sequence[str]) -> str | None:
    """What a folder named ``name`` beside the output would be if we made it: ``partial``, ``old``, ``staging``.

    ``.<out>.partial-ID`` and ``.<out>.old-ID``; with ``staging_tags`` (the batch's) also ``.<out><tag>ID``
    and its own conversion's ``..<out><tag>ID.partial-ID``. ID is :data:`ID_LEN` lowercase hex digits.
    """
    for tag, kind in ((PARTIAL_TAG, "partial"), (OLD_TAG, "old"), *((t, "staging") for t in staging_tags)):
        head = f".{output_name}{tag}"
        if name.startswith(head) and _is_id(name[len(head):]):
            return kind
        rest = name[len(head) + 1:]  # after ``..<out><tag>``: ``ID.partial-ID``
        if (kind == "staging" and name.startswith("." + head) and _is_id(rest[:ID_LEN])
                and rest[ID_LEN:].startswith(PARTIAL_TAG) and _is_id(rest[ID_LEN + len(PARTIAL_TAG):])):
            return "partial"
    return None


def _staging_record_ok(fd: int, output_name: str) -> bool:
    """Whether an open lock file is ours: a small regular file holding our record for ``output_name``.

    An empty one is accepted too: versions before the record wrote the lock file empty.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
        return False
    raw = os.pread(fd, 4096, 0)
    if not raw:
        return True
    try:
        record = json.loads(raw)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("format") == STAGING_FORMAT and record.get("output") == output_name


@contextlib.contextmanager
def _taken_lock(folder: Path) -> Iterator[bool | None]:
    """Yield True while holding a dead partial's lock, False if it is ours and held (or not ours), None if absent."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        yield None
        return
    except OSError:
        yield False
        return
    try:
        output_name = folder.name[1:-(len(PARTIAL_TAG) + ID_LEN)]
        if not _staging_record_ok(fd, output_name):
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:  # removed meanwhile by a publisher clearing its old output (outside the folder lock)
        return False


def _is_input_related(folder: Path, protect: Sequence[Path]) -> bool:
    return any(is_within(folder, p) or is_within(p, folder) for p in protect)


def clean_stale(output: Path, protect: Sequence[Path] = (), staging_tags: Sequence[str] = ()) -> list[Path]:
    """Remove our leftovers for ``output`` from killed runs; put back an old output a kill left aside.

    The one cleaner of convert and batch. Only folders named as ours (:func:`_leftover_kind`), real
    folders (not symlinks), none of them an input or holding or inside one (``protect``), are touched:

    * a temporary folder (``partial``) whose lock file is ours and free (its conversion is dead), or
      that has no lock file but holds our marker (killed between the last two steps of publishing);
    * a backup of an old output (``old``) that holds our marker: put back when the output is missing
      (killed between :func:`~vllm_consolidate.write.publish.publish`'s two renames), else removed;
    * a batch staging folder (``staging``, only with ``staging_tags``) that holds our marker. Its
      writers hold the batch lock shared; the caller must hold it exclusively.

    Everything runs under :func:`~vllm_consolidate.write.publish.folder_lock`, so no live conversion is
    caught between two steps.

    Returns:
        What was removed (not what was put back).
    """
    output = Path(output).absolute()
    parent = output.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    with folder_lock(parent):
        for p in sorted(parent.iterdir()):
            kind = _leftover_kind(p.name, output.name, staging_tags)
            if kind is None or not _is_real_dir(p) or _is_input_related(p, protect):
                continue
            if kind == "partial":
                with _taken_lock(p) as free:
                    if free or (free is None and is_ours(p)):
                        shutil.rmtree(p, ignore_errors=True)
                        removed.append(p)
            elif is_ours(p):
                if kind == "old" and not os.path.lexists(output):
                    os.rename(p, output)
                    continue
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def discard(folder: Path) -> list[Path]:
    """Remove a folder we published whose publishing went no further (a batch job's staging folder), and
    the dead temporary folders of the conversion into it; what :func:`clean_stale` allows, nothing else.

    Returns:
        What was removed.
    """
    folder = Path(folder).absolute()
    removed = clean_stale(folder)
    with folder_lock(folder.parent):
        if is_ours(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


__all__ = ["clean_stale", "discard"]
