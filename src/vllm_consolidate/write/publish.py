"""Where an output may go, and how it gets there: never into the input, never half a model.

Every conversion writes into a temporary sibling of ``--output`` (``.<name>.partial-XXXXXXXX``, on the
same file system so the final rename is atomic) and renames it into place only when it is complete
and validated. The rules, each checked before anything is written or removed:

* **The input is never touched.** ``--output`` may not be the input, lie inside it, or contain it:
  after resolving symlinks, and by device and inode of every ancestor, so that a bind mount of the
  input is caught too (:func:`check_output_location`). With ``--force`` over a parent of the input,
  the old output's removal would delete the checkpoint; an output inside a run folder would later be
  read back as part of the run.
* **Only our own folders are replaced.** ``--force`` replaces a real folder that holds our marker
  :data:`MARKER_NAME` (every output we write has it), and nothing else: not a file, a symlink, a
  device, or a folder someone else wrote (:func:`check_replaceable`).
* **One writer at a time in a folder.** Creating a temporary folder, the renames that publish one and
  the cleanup of leftovers all hold an exclusive ``flock`` on the output's parent folder itself
  (:func:`folder_lock`; no file is added), so two conversions to the same output never interleave:
  with ``--force`` the later one replaces the earlier one's complete output, without it the later one
  fails with :class:`~vllm_consolidate.errors.OutputExistsError` (exit 6).
* **Nothing is left behind.** A temporary folder holds an exclusive ``flock`` on its lock file
  :data:`LOCK_NAME`, which names the output it is for. A conversion killed with SIGKILL cannot clean
  up; the next one for the same output removes what it left, and only that
  (:mod:`vllm_consolidate.write.cleanup`). Parent folders a failed run created are removed again
  (:class:`CreatedParents`).
* **Disk and permissions fail early and by name**: the disk preflight counts weights and assets;
  a read-only, immutable or full output file system and an over-long name or path are user errors
  with their own exit codes (:func:`os_error`, :func:`check_output_name`, :func:`check_output_path`).
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
from collections.abc import Iterator
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
from vllm_consolidate.safe_io import contains, open_file

#: Written into every output folder: provenance, and the proof that the folder is ours to replace.
MARKER_NAME = ".vllm-consolidate.json"
MARKER_FORMAT = "vllm-consolidate-output"
PARTIAL_TAG = ".partial-"
OLD_TAG = ".old-"
#: The lock file of a temporary folder; it holds a :data:`STAGING_FORMAT` record naming the output.
LOCK_NAME = ".vllm-consolidate.lock"
STAGING_FORMAT = "vllm-consolidate-staging"
#: Hex digits of the random id in a temporary or backup folder's name.
ID_LEN = 8
#: ``.`` + name + ``.partial-`` + 8 hex digits: what a temporary name adds to the output's name.
TEMP_NAME_OVERHEAD = 1 + len(PARTIAL_TAG) + ID_LEN
NAME_MAX = 255
#: Room kept for the path of a file inside an output (``model-00001-of-00002.safetensors``, a chat template).
FILE_ROOM = 64
#: How long a conversion waits for another one to finish renaming or cleaning in the same folder.
FOLDER_LOCK_WAIT_SECONDS = 120.0


def _ids_up(path: Path) -> set[tuple[int, int]]:
    """``(st_dev, st_ino)`` of ``path`` (symlinks resolved) and of each of its existing ancestors.

    Two spellings of one folder (a bind mount, a second mount of the same file system) resolve to
    different paths but share the device and inode, which is what this compares.
    """
    try:
        real = Path(path).resolve(strict=False)
    except (OSError, RuntimeError):
        return set()
    ids = set()
    for p in (real, *real.parents):
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def is_within(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or inside it: by resolved path, or by device and inode of its ancestors."""
    if contains(parent, child):
        return True
    try:
        st = os.stat(parent)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _ids_up(child)


def check_output_location(output: Path, inputs: list[Path]) -> None:
    """Refuse an output that is an input, lies inside one, or contains one (see :func:`is_within`).

    Raises:
        UsageError: Naming the input it collides with.
    """
    output = Path(output).absolute()
    for inp in inputs:
        if is_within(output, inp):
            raise UsageError(
                "--output is the input folder or inside it; the input is never modified",
                path=output, hint=f"Choose an output folder outside {inp}.")
        if is_within(inp, output):
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


def _path_max(path: Path) -> int:
    """The longest path (without its NUL) the file system of ``path``'s nearest existing ancestor takes."""
    for folder in (path, *path.parents):
        try:
            return int(os.pathconf(folder, "PC_PATH_MAX")) - 1
        except (OSError, ValueError):
            continue
    return 4095


def check_output_path(output: Path, overhead: int = TEMP_NAME_OVERHEAD, *, what: str = "--output") -> None:
    """The output's full path must leave room for the temporary names and the files inside (``PATH_MAX``).

    Checked before anything touches the path: the kernel refuses a longer one with ``ENAMETOOLONG``
    wherever it is first used.

    Args:
        output: The output folder.
        overhead: Bytes the longest temporary name adds to the output's name.
        what: How the message names the path (the batch says ``--output-dir``).

    Raises:
        OutputNotWritableError: The path is too long.
    """
    path = Path(output).absolute()
    length = len(os.fsencode(path))
    limit = _path_max(path.parent)
    room = limit - overhead - 1 - FILE_ROOM
    if length > room:
        raise OutputNotWritableError(
            f"{what} makes an output path of {length:,} bytes; the file system takes paths up to {limit:,} bytes, "
            f"so with the temporary name and the files inside it must stay within {room:,}",
            path=path if what == "--output" else path.parent, hint=f"Choose a shorter {what}.")


def is_ours(folder: Path) -> bool:
    """A real folder (not a symlink) holding our marker (a regular file: a FIFO named like it is not waited on)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        with open_file(Path(folder) / MARKER_NAME) as fh:
            raw = fh.read(1 << 20)
    except (OSError, ConsolidateError):
        return False
    return is_marker(raw)


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


def marker_text(info: dict[str, Any]) -> str:
    """The marker's content: our provenance record (``format`` proves the output ours)."""
    record = {"format": MARKER_FORMAT, "tool": "vllm-consolidate", "tool_version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    return json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"


def is_marker(raw: bytes | None) -> bool:
    """Whether ``raw`` (a marker file's bytes) is our marker."""
    try:
        data = json.loads(raw) if raw is not None else None
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("format") == MARKER_FORMAT


def write_marker(folder: Path, info: dict[str, Any]) -> None:
    """Write the marker (our provenance record) into a staged output folder."""
    (Path(folder) / MARKER_NAME).write_text(marker_text(info), encoding="utf-8")


@contextlib.contextmanager
def folder_lock(folder: Path, wait: float = FOLDER_LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself while creating, renaming or cleaning our folders in it.

    The lock is on the directory, so nothing is added to it. Where a directory cannot be locked (no
    read permission; NFS, whose ``flock`` needs a file open for writing) the body runs unlocked.

    Raises:
        OutputExistsError: Another process held the lock for ``wait`` seconds.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        fd = None
    try:
        if fd is not None and not _flock_within(fd, wait):
            raise OutputExistsError(
                f"another process kept {folder} locked for {wait:.0f} s while writing an output there",
                path=folder, hint="Wait for the other conversion to finish, or choose another output folder.")
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _flock_within(fd: int, wait: float) -> bool:
    """Take an exclusive flock on ``fd`` within ``wait`` seconds; True also where flock is unsupported."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        except OSError:
            return True


class Staging:
    """The temporary sibling folder of one conversion, locked while it lives.

    Use as a context manager: on any exception the folder is removed; :meth:`publish` renames it
    into place.
    """

    def __init__(self, output: Path):
        self.output = Path(output).absolute()
        self.path = self.output.with_name(f".{self.output.name}{PARTIAL_TAG}{uuid.uuid4().hex[:ID_LEN]}")
        self._lock_fd: int | None = None

    def __enter__(self) -> Staging:
        # Under the folder lock, so that no cleaner sees the folder before its lock file is ours and held.
        with folder_lock(self.output.parent):
            self.path.mkdir()
            try:
                self._lock_fd = os.open(self.path / LOCK_NAME,
                                        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                record = {"format": STAGING_FORMAT, "output": self.output.name, "pid": os.getpid()}
                os.write(self._lock_fd, json.dumps(record).encode())
            except BaseException:
                self._unlock()
                shutil.rmtree(self.path, ignore_errors=True)
                raise
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
        with folder_lock(self.output.parent):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / LOCK_NAME)  # our lock is held by the descriptor, not the name
            old = _swap_in(self.path, self.output, force)
        _remove(old)


def publish(tmp: Path, output: Path, force: bool) -> None:
    """Move a finished folder to ``output``; an old output (ours, see :func:`check_replaceable`) goes only after."""
    output = Path(output).absolute()
    with folder_lock(output.parent):
        old = _swap_in(Path(tmp), output, force)
    _remove(old)


def _swap_in(tmp: Path, output: Path, force: bool) -> Path | None:
    """Rename ``tmp`` to ``output`` (under :func:`folder_lock`); return where the old output was moved, if any."""
    if not os.path.lexists(output):
        os.rename(tmp, output)
        return None
    check_replaceable(output, force)
    old = output.with_name(f".{output.name}{OLD_TAG}{uuid.uuid4().hex[:ID_LEN]}")
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    return old


def _remove(folder: Path | None) -> None:
    # Outside the folder lock: removing a large old output takes time, and the folder is no one's now
    # (a cleaner that finds it removes it too; both ignore what the other removed first).
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


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
    "LOCK_NAME", "MARKER_NAME", "CreatedParents", "Staging", "check_output_location", "check_output_name",
    "check_output_path", "check_replaceable", "folder_lock", "is_marker", "is_ours", "is_within", "marker_text",
    "os_error", "preflight_disk", "publish", "write_marker",
]
