"""What the cleaner may remove, and the folder lock that keeps two conversions of one output apart (issue 22, 4-5).

In-process and on a tmp folder only. The interleavings of two conversions are forced with threads that
stop one of them between two steps (a patched ``flock`` or ``rename``); each test also passes on the
unpatched code path, and fails on the code before the fix (see the report of issue 22).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from vllm_consolidate.errors import OutputExistsError, UsageError
from vllm_consolidate.write import cleanup
from vllm_consolidate.write import publish as pub

ID = "abcdef12"


def _ours(folder: Path, content: str = "ours") -> Path:
    """A folder holding our marker, as every output we write does."""
    folder.mkdir(parents=True)
    pub.write_marker(folder, {})
    (folder / "model.safetensors").write_text(content)
    return folder


def _partial(parent: Path, name: str, lock: bytes | None) -> Path:
    """A temporary folder as a killed conversion leaves it: ``lock`` is its lock file's content (None: no lock)."""
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("half")
    if lock is not None:
        (folder / pub.LOCK_NAME).write_bytes(lock)
    return folder


def _record(output_name: str) -> bytes:
    return json.dumps({"format": "vllm-consolidate-staging", "output": output_name, "pid": 1}).encode()


def _aged(folder: Path, seconds: float = 7200) -> Path:
    then = time.time() - seconds
    os.utime(folder, (then, then))
    return folder


# -- what is ours ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [
    (".out.partial-abcdef12", "partial"), (".out.old-abcdef12", "old"), (".out.batch-abcdef12", "staging"),
    ("..out.batch-abcdef12.partial-0123abcd", "partial"), (".out.partial-backup", None), (".out.old-ABCDEF12", None),
    (".out.old-abcdef123", None), (".out.batch-abcdef12.partial-0123abcd", None), (".outx.partial-abcdef12", None),
    ("out.partial-abcdef12", None), ("..out.partial-abcdef12.partial-0123abcd", None),
])
def test_leftover_names(name: str, kind: str | None) -> None:
    assert cleanup._leftover_kind(name, "out", (".batch-",)) == kind


def test_only_our_dead_partials_and_marked_backups_go(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _ours(out)
    dead = _partial(tmp_path, ".out.partial-00000001", _record("out"))
    legacy = _partial(tmp_path, ".out.partial-00000002", b"")  # lock files were empty before the record
    unlocked = _aged(_partial(tmp_path, ".out.partial-00000003", None))  # a user's folder named like ours, 2 h old
    foreign_lock = _partial(tmp_path, ".out.partial-00000004", b"someone else's lock")
    other_output = _partial(tmp_path, ".out.partial-00000005", _record("other"))
    backup = tmp_path / ".out.old-00000006"
    backup.mkdir()
    (backup / "weights.bin").write_text("a user's backup")
    old = _ours(tmp_path / ".out.old-00000007")
    live = _partial(tmp_path, ".out.partial-00000008", _record("out"))
    fd = os.open(live / pub.LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        removed = cleanup.clean_stale(out)
    finally:
        os.close(fd)
    assert sorted(p.name for p in removed) == sorted(p.name for p in (dead, legacy, old))
    for kept in (unlocked, foreign_lock, other_output, backup, live):
        assert kept.is_dir() and (kept / next(iter(os.listdir(kept)))).exists(), kept
    assert out.is_dir()


def test_partial_without_lock_but_with_our_marker_goes(tmp_path: Path) -> None:
    """Killed between removing its lock file and the rename: a complete output of ours, never published."""
    folder = _ours(tmp_path / ".out.partial-0000000a")
    assert cleanup.clean_stale(tmp_path / "out") == [folder]


def test_lock_file_that_is_not_a_regular_file_keeps_the_folder(tmp_path: Path) -> None:
    folder = _partial(tmp_path, ".out.partial-0000000b", None)
    os.mkfifo(folder / pub.LOCK_NAME)
    assert cleanup.clean_stale(tmp_path / "out") == []
    assert stat.S_ISFIFO(os.lstat(folder / pub.LOCK_NAME).st_mode)


def test_an_input_is_never_cleaned_whatever_its_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    partial = _partial(tmp_path, f".out.partial-{ID}", _record("out"))
    old = _ours(tmp_path / ".out.old-0000000c")  # output missing: would be put back
    holder = _partial(tmp_path, ".out.partial-0000000d", _record("out"))
    inner = holder / "global_step2"
    inner.mkdir()
    assert cleanup.clean_stale(out, protect=[partial, old, inner]) == []
    assert partial.is_dir() and old.is_dir() and inner.is_dir() and not out.exists()
    # The same folders, not named as inputs, are ours to clean.
    assert len(cleanup.clean_stale(out)) == 2 and out.is_dir()


def test_an_input_reached_through_a_symlink_is_protected(tmp_path: Path) -> None:
    partial = _partial(tmp_path, f".out.partial-{ID}", _record("out"))
    link = tmp_path / "link"
    link.symlink_to(partial)
    assert cleanup.clean_stale(tmp_path / "out", protect=[link]) == []


def test_batch_staging_folders_only_with_the_batch_tag(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = _ours(tmp_path / f".out.batch-{ID}")
    unmarked = tmp_path / ".out.batch-0000000e"
    unmarked.mkdir()
    nested = _partial(tmp_path, f"..out.batch-{ID}.partial-0000000f", _record(f".out.batch-{ID}"))
    assert cleanup.clean_stale(out) == []
    removed = cleanup.clean_stale(out, staging_tags=(".batch-",))
    assert sorted(removed) == sorted([staging, nested]) and unmarked.is_dir()


def test_discard_removes_an_attempt_that_is_ours_only(tmp_path: Path) -> None:
    staging = _ours(tmp_path / f".out.batch-{ID}")
    nested = _partial(tmp_path, f"..out.batch-{ID}.partial-00000010", _record(f".out.batch-{ID}"))
    assert sorted(cleanup.discard(staging)) == sorted([staging, nested])
    foreign = tmp_path / f".own.batch-{ID}"
    foreign.mkdir()
    assert cleanup.discard(foreign) == [] and foreign.is_dir()


# -- two conversions of one output ------------------------------------------------------------------------


class _Pause:
    """Stops the thread named ``who`` at the first call ``hit(*args)`` accepts, until :meth:`go`."""

    def __init__(self, who: str):
        self.who, self.reached, self.released = who, threading.Event(), threading.Event()
        self.done = False

    def maybe(self, hit: bool) -> None:
        if hit and not self.done and threading.current_thread().name == self.who:
            self.done = True
            self.reached.set()
            assert self.released.wait(30), "the test never released the paused thread"

    def go(self) -> None:
        self.released.set()


def _run(name: str, fn, errors: dict[str, BaseException | None]) -> threading.Thread:
    def body() -> None:
        try:
            fn()
            errors[name] = None
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors[name] = exc

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t


def test_cleaner_never_takes_a_temporary_folder_being_created(tmp_path: Path, monkeypatch) -> None:
    """The race behind 1 in 17 concurrent ``--force`` runs exiting 70: a cleaner took the lock of a partial
    created a moment before, between its ``open`` and its ``flock``, and removed it under the writer."""
    out = tmp_path / "out"
    pause = _Pause("creator")
    real_flock = fcntl.flock

    def flock(fd, op):  # stop the creator just before it locks its new lock file (a regular file, not the folder)
        pause.maybe(stat.S_ISREG(os.fstat(fd).st_mode) and op == fcntl.LOCK_EX)
        return real_flock(fd, op)

    monkeypatch.setattr(pub.fcntl, "flock", flock)
    staging = pub.Staging(out)
    errors: dict[str, BaseException | None] = {}
    creator = _run("creator", staging.__enter__, errors)
    assert pause.reached.wait(10)
    cleaned: list[Path] = []
    cleaner = _run("cleaner", lambda: cleaned.extend(cleanup.clean_stale(out)), errors)
    cleaner.join(0.5)
    waited = cleaner.is_alive()
    pause.go()
    creator.join(10)
    cleaner.join(10)
    try:
        assert errors == {"creator": None, "cleaner": None}, errors
        assert cleaned == [] and staging.path.is_dir(), "the cleaner removed a live conversion's folder"
        assert waited, "the cleaner must wait for the folder lock while a temporary folder is being created"
    finally:
        staging.__exit__(None, None, None)


def test_two_publishers_of_one_output_take_turns(tmp_path: Path, monkeypatch) -> None:
    """The other window: both saw no output; the second renamed its folder in between the first's check
    and rename, and the first's rename failed (ENOTEMPTY, exit 70) instead of replacing it."""
    out = tmp_path / "out"
    first, second = _ours(tmp_path / ".out.partial-00000011", "first"), _ours(tmp_path / ".out.partial-00000012",
                                                                            "second")
    pause = _Pause("first")
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        pause.maybe(Path(dst) == out)
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(pub.os, "rename", rename)
    errors: dict[str, BaseException | None] = {}
    a = _run("first", lambda: pub.publish(first, out, force=True), errors)
    assert pause.reached.wait(10)
    b = _run("second", lambda: pub.publish(second, out, force=True), errors)
    b.join(0.5)
    waited = b.is_alive()
    pause.go()
    a.join(10)
    b.join(10)
    assert errors == {"first": None, "second": None}, errors
    assert waited, "the second publisher must wait for the first"
    assert (out / "model.safetensors").read_text() == "second" and pub.is_ours(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_force_the_later_publisher_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pub.publish(_ours(tmp_path / ".out.partial-00000013", "first"), out, force=False)
    later = _ours(tmp_path / ".out.partial-00000014", "later")
    with pytest.raises(OutputExistsError, match="already exists"):
        pub.publish(later, out, force=False)
    assert (out / "model.safetensors").read_text() == "first" and later.is_dir()


def test_folder_lock_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with pytest.raises(OutputExistsError, match="kept .* locked for 0 s"):
            with pub.folder_lock(tmp_path, wait=0.2):
                pass
        assert time.monotonic() - started < 5
    finally:
        os.close(fd)


# -- where an output may go ---------------------------------------------------------------------------------


def test_output_inside_the_input_is_caught_by_inode_where_paths_differ(tmp_path: Path, monkeypatch) -> None:
    """A bind mount gives the input a second path that resolving symlinks cannot see: with the path
    comparison blinded, the device/inode walk over the ancestors still refuses both directions."""
    inp = tmp_path / "runs" / "ckpt"
    inp.mkdir(parents=True)
    monkeypatch.setattr(pub, "contains", lambda parent, child: False)
    with pytest.raises(UsageError, match="inside it"):
        pub.check_output_location(inp / "consolidated" / "deeper", [inp])
    with pytest.raises(UsageError, match="contains the input"):
        pub.check_output_location(tmp_path / "runs", [inp])
    pub.check_output_location(tmp_path / "elsewhere", [inp])


def test_output_path_longer_than_the_file_system_takes_is_exit_12(tmp_path: Path) -> None:
    from vllm_consolidate.cli.common import exit_code

    deep = tmp_path.joinpath(*["d" * 200] * 25, "out")
    with pytest.raises(Exception, match="output path of") as info:
        pub.check_output_path(deep)
    assert exit_code(info.value) == 12
    pub.check_output_path(tmp_path / "out")
