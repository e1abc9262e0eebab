"""The batch's worker processes: each converts the jobs it is sent, one at a time, until told to stop.

A worker writes a job into its staging folder (``.<name>.batch-XXXXXXXX``, see
:func:`~vllm_consolidate.batch.inputs.staging_path`), writes the manifest there, and renames it over
the output. It removes the staging folder when the job fails or the worker gets SIGTERM/SIGINT, and
gets SIGTERM itself when the batch process dies (Linux ``PR_SET_PDEATHSIG``). It holds the batch lock
shared, so a new batch on the same output folder cannot clean up under it.

Messages to the batch, over the pipe: ``(EventKind.PROGRESS, id, done, total)``,
``(EventKind.DONE, id, {"result": ..., "peak_rss": ...})`` and ``(EventKind.FAILED, id, job error)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from vllm_consolidate.batch.manifest import write_manifest
from vllm_consolidate.batch.objects import clear_staging
from vllm_consolidate.batch.plan import Job, job_error
from vllm_consolidate.batch.states import EventKind
from vllm_consolidate.convert import ConvertOptions, convert
from vllm_consolidate.signals import sigterm_raises_interrupt
from vllm_consolidate.write.cleanup import discard

#: Tests only: seconds a worker waits between converting and publishing a job.
TEST_DELAY_ENV = "VLLMC_TEST_JOB_DELAY"
#: Seconds between progress messages (the last one, at 100 %, is always sent).
_PROGRESS_EVERY = 1.0


@dataclass(frozen=True)
class JobSpec:
    """One job as a worker gets it (pickled over the pipe).

    Attributes:
        id: The job's id in the plan.
        options: The conversion; ``output`` is the staging folder, which is the worker's to replace.
        output: Where the staging folder is renamed to when complete; for an object-store output its URL
            (a ``str``), which is then also ``options.output``.
        manifest: The plan's part of the manifest (:func:`~vllm_consolidate.batch.manifest.manifest_base`).
        debug: Include the traceback in a failure.
    """

    id: int
    options: ConvertOptions
    output: Path | str
    manifest: dict[str, Any]
    debug: bool = False

    @property
    def remote_output(self) -> bool:
        """Whether ``output`` is an object-store URL (convert itself stages and commits it; no manifest file)."""
        return isinstance(self.output, str)

    @property
    def staging(self) -> Path:
        assert self.options.output is not None
        return Path(self.options.output)


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement for this process (Linux: ``/proc/self/clear_refs``; else a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """This process's peak RSS since :func:`reset_peak_rss` (its own memory only).

    Why not ``getrusage().ru_maxrss``: Linux carries it across ``exec``, so a worker spawned (fork + exec) by a
    large parent reported the parent's RSS at fork (1.6 GB for a tiny job started from a test process).
    ``VmHWM`` belongs to the process's own address space; ``ru_maxrss`` is the fallback off Linux.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _set_pdeathsig() -> None:
    # Best effort: only Linux has prctl; elsewhere an orphaned worker ends when its pipe closes.
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def clear_attempt(spec: JobSpec) -> None:
    """Remove what an attempt at a job left: its staging folder and convert()'s ``..<staging>.partial-*`` beside it.

    A worker killed mid-convert (SIGKILL: out of memory, or its Ray node lost) can remove neither. Only
    what carries our marker or a free lock of ours goes (:func:`~vllm_consolidate.write.cleanup.discard`).
    For an object-store output: the staging prefix of a provably dead attempt on this machine.
    """
    if spec.remote_output:
        clear_staging(str(spec.output), dict(spec.options.storage_options))
    else:
        discard(spec.staging)


@contextlib.contextmanager
def shared_lock(lock_path: str | None) -> Iterator[None]:
    """Hold the batch lock shared while jobs convert (in a local worker or a Ray task).

    No other batch can then clean up the output folder under a running job. None (an object-store output,
    whose lock object the driver holds): nothing to hold.
    """
    if lock_path is None:
        yield
        return
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def worker_main(conn: Connection, lock_path: str | None) -> None:
    """Worker process: convert jobs sent over ``conn`` until it gets None, the pipe closes, or SIGTERM."""
    _set_pdeathsig()
    with contextlib.suppress(KeyboardInterrupt), sigterm_raises_interrupt(), shared_lock(lock_path):
        if os.getppid() == 1:  # the batch died before we set PDEATHSIG
            return
        while True:
            try:
                spec = conn.recv()
            except EOFError:
                return
            if spec is None:
                return
            run_job(conn, spec)


def run_job(conn: Connection, spec: JobSpec) -> None:
    """Convert one job into its staging folder, write its manifest, publish it, and report back.

    Raises:
        KeyboardInterrupt: SIGTERM/SIGINT, after the staging folder is removed.
    """

    from vllm_consolidate.write.publish import publish

    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_EVERY or done == total:
            last[0] = now
            conn.send((EventKind.PROGRESS, spec.id, done, total))

    reset_peak_rss()  # this job's peak, not an earlier job's in this reused worker
    try:
        result = convert(spec.options, progress=progress).to_dict()
        result["output"] = str(spec.output)
        if not spec.remote_output:  # an object-store output is committed by convert; the driver records it
            if os.environ.get(TEST_DELAY_ENV):  # tests only: widen the window in which a job is unpublished
                time.sleep(float(os.environ[TEST_DELAY_ENV]))
            write_manifest(Path(spec.staging), spec.manifest, result)
            publish(Path(spec.staging), Path(spec.output), force=True)
        conn.send((EventKind.DONE, spec.id, {"result": result, "peak_rss": peak_rss_bytes()}))
    except BaseException as exc:
        if not spec.remote_output:  # convert removed its own staging prefix
            shutil.rmtree(spec.staging, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            raise
        conn.send((EventKind.FAILED, spec.id, job_error(exc, debug=spec.debug)))


class Worker:
    """The batch's handle on one worker process: its pipe, its process and the job it runs."""

    def __init__(self, ctx: Any, lock_path: str | None):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, lock_path), daemon=True,
                                name="vllm-consolidate-worker")
        self.proc.start()
        child.close()
        self.job: Job | None = None

    @property
    def idle(self) -> bool:
        return self.job is None and self.proc.is_alive()

    def send(self, spec: JobSpec) -> None:
        self.conn.send(spec)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit after its job; kill it if it has not within ``timeout``."""
        if self.proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)
            self.proc.join(timeout)
        self.kill()

    def kill(self, timeout: float = 10.0) -> None:
        """SIGTERM (the worker removes its staging folder), then SIGKILL if it does not exit."""
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        with contextlib.suppress(OSError):
            self.conn.close()


__all__ = ["TEST_DELAY_ENV", "JobSpec", "Worker", "clear_attempt", "run_job", "shared_lock", "worker_main"]
