"""Where an output may go, and how it gets there: never into the input, never half a model.

Every conversion writes into a temporary sibling of ``--output`` (``.<name>.partial-XXXXXXXX``, on the
same file system so the final rename is atomic) and renames it into place only when it is complete
and validated. The rules, each checked before anything is written or removed:

* **The input is never touched.** ``--output`` may not be the input, lie inside it, or contain it,
  after resolving symlinks (:func:`check_output_location`). With ``--force`` over a parent of the
  input, the old output's removal would delete the checkpoint; an output inside a run folder would
  later be read back as part of the run.
* **Only our own folders are replaced.** ``--force`` replaces a real folder that holds our marker
  :data:`MARKER_NAME` (every output we write has it), and nothing else: not a file, a symlink, a
  device, or a folder someone else wrote (:func:`check_replaceable`).
* **Nothing is left behind.** A temporary folder holds an exclusive ``flock`` on a lock file inside
  it while its conversion runs. A conversion killed with SIGKILL cannot clean up, so the next one for
  the same output removes every ``.<name>.partial-*`` whose lock is free (:func:`clean_stale`), and
  puts back an old output that a kill left renamed aside. Parent folders a failed run created are
  removed again (:class:`CreatedParents`).
* **Disk and permissions fail early and by name**: the disk preflight counts weights and assets;
  a read-only, immutable or full output file system and an over-long name are user errors with
  their own exit codes (:func:`os_error`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any

from vllm_consolidate._version import __version__
from vllm_consolidate.errors import (
    ConsolidateError,
    InsufficientDiskError,
    OutputExistsError,
    OutputNotWritableError,
    UsageError,
)
from vllm_consolidate.safe_io import contains

#: Written into every output folder: provenance, and the proof that the folder is ours to replace.
MARKER_NAME = ".vllm-consolidate.json"
MARKER_FORMAT = "vllm-consolidate-output"
PARTIAL_TAG = ".partial-"
OLD_TAG = ".old-"
LOCK_NAME = ".vllm-consolidate.lock"
#: ``.`` + name + ``.partial-`` + 8 hex digits: what a temporary name adds to the output's name.
TEMP_NAME_OVERHEAD = 1 + len(PARTIAL_TAG) + 8
NAME_MAX = 255
#: A temporary folder without a lock file (killed between mkdir and lock, or after the lock file was
#: removed just before the rename) is stale once it is this old.
UNLOCKED_STALE_SECONDS = 600


def check_output_location(output: Path, inputs: list[Path]) -> None:
    """Refuse an output that is an input, lies inside one, or contains one (symlinks resolved).

    Raises:
        UsageError: Naming the input it collides with.
    """
    output = Path(output).absolute()
    for inp in inputs:
        if contains(inp, output):
            raise UsageError(
                "--output is the input folder or inside it; the input is never modified",
                path=output, hint=f"Choose an output folder outside {inp}.")
        if contains(output, inp):
            raise UsageError(
                "--output contains the input; writing (or replacing with --force) there would destroy the input",
                path=output, hint=f"Choose an output folder that is not a parent of {inp}.")


def check_output_name(output: Path) -> None:
    """The output's name must leave room for the temporary name on a 255-byte file system."""
    length = len(Path(output).name.encode("utf-8", "surrogateescape"))
    if length + TEMP_NAME_OVERHEAD > NAME_MAX:
        raise UsageError(
            f"the output folder's name is {length} bytes; with the temporary name it must stay within "
            f"{NAME_MAX - TEMP_NAME_OVERHEAD} bytes", path=output, hint="Choose a shorter --output name.")


def is_ours(folder: Path) -> bool:
    """A real folder (not a symlink) holding our marker."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        with open(Path(folder) / MARKER_NAME, encoding="utf-8") as fh:
            data = json.loads(fh.read(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == MARKER_FORMAT


def check_replaceable(output: Path, force: bool) -> None:
    """Whether an existing ``output`` may be replaced (only with ``force``, only if ours).

    Raises:
        OutputExistsError: It exists and ``force`` is off, or it is not a folder we wrote.
    """
    if not os.path.lexists(output):
        return
    if not force:
        raise OutputExistsError("output already exists", path=output)
    mode = os.lstat(output).st_mode
    if not stat.S_ISDIR(mode):
        what = "a symlink" if stat.S_ISLNK(mode) else "a file" if stat.S_ISREG(mode) else "not a folder"
        raise OutputExistsError(f"output exists and is {what}, not an output folder written by vllm-consolidate; "
                                "--force will not replace it", path=output,
                                hint="Remove it yourself, or choose another --output.")
    if not is_ours(output):
        raise OutputExistsError(
            f"output exists and was not written by vllm-consolidate (no {MARKER_NAME}); --force will not replace it",
            path=output, hint="Remove it yourself if it is disposable, or choose another --output.")


def write_marker(folder: Path, info: dict[str, Any]) -> None:
    """Write the marker (our provenance record) into a staged output folder."""
    record = {"format": MARKER_FORMAT, "tool": "vllm-consolidate", "tool_version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    (Path(folder) / MARKER_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n",
                                            encoding="utf-8")


class Staging:
    """The temporary sibling folder of one conversion, locked while it lives.

    Use as a context manager: on any exception the folder is removed; :meth:`publish` renames it
    into place.
    """

    def __init__(self, output: Path):
        self.output = Path(output).absolute()
        self.path = self.output.with_name(f".{self.output.name}{PARTIAL_TAG}{uuid.uuid4().hex[:8]}")
        self._lock_fd: int | None = None

    def __enter__(self) -> Staging:
        self.path.mkdir()
        self._lock_fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def publish(self, force: bool) -> None:
        """Rename the finished folder to the output; an old output is removed only afterwards."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / LOCK_NAME)  # our lock is held by the descriptor, not the name
        publish(self.path, self.output, force)


def publish(tmp: Path, output: Path, force: bool) -> None:
    """Move a finished folder to ``output``; an old output (ours, see :func:`check_replaceable`) goes only after."""
    if os.path.lexists(output):
        check_replaceable(output, force)
        old = output.with_name(f".{output.name}{OLD_TAG}{uuid.uuid4().hex[:8]}")
        os.rename(output, old)
        try:
            os.rename(tmp, output)
        except BaseException:
            os.rename(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)


def _lock_is_free(folder: Path) -> bool | None:
    """True when no live process holds the folder's lock; None when it has no lock file."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def clean_stale(output: Path) -> list[Path]:
    """Remove our leftovers for ``output`` from killed runs; put back an old output a kill left aside.

    Only folders named as ours (``.<name>.partial-*``, ``.<name>.old-*``) and no longer in use are
    touched. Returns what was removed.
    """
    output = Path(output).absolute()
    parent = output.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    prefix = f".{output.name}"
    for p in sorted(parent.iterdir()):
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        rest = p.name[len(prefix):]
        if rest.startswith(PARTIAL_TAG) and len(rest) == len(PARTIAL_TAG) + 8:
            free = _lock_is_free(p)
            if free is None:
                free = time.time() - p.stat().st_mtime > UNLOCKED_STALE_SECONDS
            if free:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        elif rest.startswith(OLD_TAG) and len(rest) == len(OLD_TAG) + 8 and is_ours(p):
            if not os.path.lexists(output):  # killed between the two renames of publish(): restore it
                os.rename(p, output)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class CreatedParents:
    """Create the output's missing parent folders, and remove them again if the run fails."""

    def __init__(self, output: Path):
        self.output = Path(output).absolute()
        self.created: list[Path] = []

    def make(self) -> None:
        missing = []
        folder = self.output.parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir()
            self.created.append(folder)

    def remove(self) -> None:
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        self.created.clear()


def preflight_disk(output: Path, need: int) -> None:
    """Fail before writing when the output's file system lacks ``need`` bytes plus a margin."""
    parent = Path(output).absolute().parent
    free = shutil.disk_usage(parent).free
    margin = 64 * 2**20 + need // 100
    if free < need + margin:
        raise InsufficientDiskError(
            f"not enough disk space: the output needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB is free",
            path=parent,
        )


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}


def os_error(exc: OSError, output: Path) -> ConsolidateError | None:
    """The user error for an OS error met while writing the output, or None if it is not about the output."""
    if exc.errno in _DISK_FULL:
        return InsufficientDiskError(f"the disk filled up while writing the output ({exc.strerror})",
                                     path=Path(output).parent)
    where = exc.filename or Path(output).parent
    if exc.errno in _NOT_WRITABLE and contains(Path(output).absolute().parent, where):
        return OutputNotWritableError(f"cannot write the output: {exc.strerror}", path=where)
    return None


__all__ = [
    "MARKER_NAME", "CreatedParents", "Staging", "check_output_location", "check_output_name", "check_replaceable",
    "clean_stale", "is_ours", "os_error", "preflight_disk", "publish", "write_marker",
]
