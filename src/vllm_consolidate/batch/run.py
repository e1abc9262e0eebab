"""Running a plan: worker processes, admission, events, cleanup, and the result.

Each job runs in a worker process (at most ``--max-workers``; spawned, reused for several jobs),
admitted by the :class:`~vllm_consolidate.batch.resources.Scheduler`. A batch holds
``.vllm-consolidate-batch.lock`` (:data:`LOCK_NAME`) in the output folder (exclusive while it cleans
up, shared while it runs; workers hold it shared), and on start removes stale ``.<name>.batch-*`` and
``.<name>.old-*`` folders of the outputs it plans.

Failure policy: without ``continue_on_error`` the first failed job stops the batch: no new job
starts, running jobs finish (their outputs are kept), the rest are reported as not run.

Where the jobs run is the :class:`Executor`'s business: :class:`LocalExecutor` (the default, the
worker processes above) or :class:`~vllm_consolidate.batch.ray_executor.RayExecutor` (one Ray task per
job). The plan, the lock, the cleanup of stale folders, the events and the result are the same for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from vllm_consolidate import __version__
from vllm_consolidate.batch.inputs import STAGING_TAG, staging_path
from vllm_consolidate.batch.manifest import content_options, manifest_base
from vllm_consolidate.batch.plan import BatchOptions, BatchPlan, Job, job_error
from vllm_consolidate.batch.states import OUTCOMES, Action, Admission, EventKind, Status
from vllm_consolidate.batch.worker import JobSpec, Worker
from vllm_consolidate.errors import BatchError, InsufficientDiskError

LOCK_NAME = ".vllm-consolidate-batch.lock"
#: How long a batch waits for another batch on the same output folder to finish cleaning up.
LOCK_WAIT_SECONDS = 60.0
#: How often the run loop wakes without news (to admit jobs that waited for RAM freed elsewhere).
_POLL_SECONDS = 1.0


@dataclass
class BatchEvent:
    """Something that happened to a job (see :class:`~vllm_consolidate.batch.states.EventKind`)."""

    kind: EventKind
    job: Job
    message: str = ""
    done: int = 0
    total: int = 0


EventFn = Callable[[BatchEvent], None]


@dataclass
class BatchResult:
    """The outcome of a batch."""

    plan: BatchPlan
    started: float
    finished: float
    #: The executor's name and what it adds to the report (nothing for ``local``; see :class:`Executor`).
    executor: str = "local"
    executor_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    job_info: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def jobs(self) -> list[Job]:
        return self.plan.jobs

    def count(self, status: Status | str) -> int:
        return sum(1 for j in self.jobs if j.status == status)

    @property
    def ok(self) -> bool:
        return all(j.status in (Status.DONE, Status.SKIPPED) for j in self.jobs)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "tool_version": __version__,
            "started": self.started,
            "finished": self.finished,
            "seconds": round(self.finished - self.started, 3),
            "ok": self.ok,
            "counts": {s: self.count(s) for s in OUTCOMES},
            "plan": self.plan.to_dict(),
            "jobs": [{**j.to_dict(), **self.job_info.get(j.id, {})} for j in self.jobs],
        }
        if self.executor != "local":  # the local report stays as it always was
            out["executor"] = {"name": self.executor, **self.executor_info}
        return out


class WorkerDied(Exception):
    """A worker process ended without reporting its job's outcome (killed, out of memory, a crash)."""


def clean_stale(output: Path) -> list[Path]:
    """Remove leftovers of killed runs for one output: ``.<name>.batch-*`` (and convert()'s
    ``..<name>.batch-*.partial-*`` inside them) and ``.<name>.old-*``. Returns what was removed."""
    parent = output.parent
    if not parent.is_dir():
        return []
    esc = glob.escape(output.name)
    removed = []
    for pat in (f".{esc}{STAGING_TAG}*", f"..{esc}{STAGING_TAG}*", f".{esc}.old-*"):
        for p in parent.glob(pat):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def _batch_lock(out_dir: Path) -> Iterator[int]:
    """Exclusive lock while cleaning up, then shared while running (workers share it too).

    Raises:
        BatchError: Another batch still holds the lock after :data:`LOCK_WAIT_SECONDS`.
    """
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BatchError("another batch is writing to this output folder", path=out_dir,
                                     hint="Wait for it to finish, or use another --output-dir.") from None
                time.sleep(0.2)
        yield fd
    finally:
        os.close(fd)


def job_spec(job: Job, opts: BatchOptions) -> JobSpec:
    """What a worker needs for ``job``: the options record (writing into a fresh staging folder) and the manifest."""
    # force: the staging folder is new and the job's own; whether the real output may be replaced was decided
    # while planning, and publish() replaces it.
    options = dataclasses.replace(
        opts.job_options(input=job.input, output=staging_path(job.output), checkpoint_dir=job.checkpoint), force=True)
    manifest = manifest_base(input=job.input, checkpoint=job.checkpoint or job.input,
                             checkpoint_name=job.checkpoint_name, step=job.step, detected=job.detected,
                             sources=job.sources, options=content_options(opts.model))
    return JobSpec(job.id, options, job.output, manifest, opts.debug)


class Executor:
    """Where a plan's jobs run: :meth:`run` starts them, reports through ``emit`` and returns the jobs never started.

    :meth:`session` is entered before the output folder is locked and cleaned (to connect to a cluster,
    so a connection error comes before anything is touched); :attr:`job_info` adds fields to each
    job's record in the report (e.g. Ray's attempts and nodes), :attr:`info` to the report's
    ``executor`` record.
    """

    name = "local"

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.job_info: dict[int, dict[str, Any]] = {}

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield

    def run(self, plan: BatchPlan, emit: EventFn, out_dir: Path, pending: list[Job]) -> list[Job]:
        raise NotImplementedError


class LocalExecutor(Executor):
    """This machine's worker processes, admitted by the plan's RAM and disk scheduler (``--executor local``)."""

    def run(self, plan: BatchPlan, emit: EventFn, out_dir: Path, pending: list[Job]) -> list[Job]:
        return _Run(plan, emit, out_dir, pending).run()


def run_batch(plan: BatchPlan, on_event: EventFn | None = None, executor: Executor | None = None) -> BatchResult:
    """Run a plan's jobs (see the module docstring for scheduling, failure policy and cleanup).

    Args:
        plan: From :func:`~vllm_consolidate.batch.plan.plan_batch`; jobs are updated in place.
        on_event: Called in this process for every :class:`BatchEvent`.
        executor: Where the jobs run; :class:`LocalExecutor` when None.

    Returns:
        The result; ``result.ok`` is False when a job failed or did not run.
    """
    executor = executor or LocalExecutor()
    emit = on_event or (lambda e: None)
    started = time.time()
    for j in plan.jobs:
        if j.action == Action.SKIP:
            j.status = Status.SKIPPED
            emit(BatchEvent(EventKind.SKIPPED, j, j.reason))
        elif j.action in (Action.BLOCKED, Action.ERROR):
            j.status = Status.FAILED
            emit(BatchEvent(EventKind.FAILED, j, (j.error or {}).get("message", "")))
    pending = list(plan.to_run)
    if pending and not (plan.problems and not plan.options.continue_on_error):
        out_dir = Path(plan.options.output_dir).absolute()
        with executor.session():
            out_dir.mkdir(parents=True, exist_ok=True)
            with _batch_lock(out_dir) as lock_fd:
                for j in plan.jobs:
                    clean_stale(j.output)
                fcntl.flock(lock_fd, fcntl.LOCK_SH)  # cleaned up: other readers may look now; workers share it
                pending = executor.run(plan, emit, out_dir, pending)
    for j in pending:
        j.status = Status.NOT_RUN
        emit(BatchEvent(EventKind.NOT_RUN, j))
    return BatchResult(plan, started, time.time(), executor.name, dict(executor.info), dict(executor.job_info))


class _Run:
    """The state of one run: the workers, the running and pending jobs, and whether to stop starting jobs."""

    def __init__(self, plan: BatchPlan, emit: EventFn, out_dir: Path, pending: list[Job]):
        self.opts = plan.options
        self.emit = emit
        self.out_dir = out_dir
        self.pending = pending
        self.sched = plan.scheduler()
        self.ctx = multiprocessing.get_context("spawn")  # fork would copy the caller's threads and locks
        self.workers: list[Worker] = []
        self.running: dict[int, Worker] = {}
        self.specs: dict[int, JobSpec] = {}
        self.waiting_noted: set[int] = set()
        self.stop = False

    def run(self) -> list[Job]:
        """Start and collect jobs until none is left or the batch stops; return the jobs never started."""
        try:
            while self.pending or self.running:
                self._admit()
                if not self.running:
                    break
                self._collect()
            return self.pending
        except BaseException:
            self._abort()
            raise
        finally:
            for w in self.workers:
                w.stop()

    def _admit(self) -> None:
        """Start pending jobs, in order, while the scheduler lets them."""
        while self.pending and not self.stop:
            job = self.pending[0]
            verdict = self.sched.check(job, len(self.running))
            if verdict == Admission.WAIT:
                if job.id not in self.waiting_noted and len(self.running) < self.opts.max_workers:
                    self.waiting_noted.add(job.id)  # said once per job, and only when resources (not slots) hold it
                    self.emit(BatchEvent(EventKind.WAITING, job, "waiting for RAM or disk"))
                return
            self.pending.pop(0)
            if verdict == Admission.NEVER:
                self._fail(job, job_error(InsufficientDiskError(
                    f"not enough disk space: the output needs about {job.est_disk_bytes / 1e9:.2f} GB, "
                    f"{self.sched.disk_left / 1e9:.2f} GB are left for this batch", path=self.out_dir)))
            else:
                self._start(job)

    def _start(self, job: Job) -> None:
        worker = next((w for w in self.workers if w.idle), None)
        if worker is None:
            worker = Worker(self.ctx, self.out_dir / LOCK_NAME)
            self.workers.append(worker)
        spec = job_spec(job, self.opts)
        self.specs[job.id] = spec
        self.sched.take(job)
        worker.job = job
        job.status, job.started = Status.RUNNING, time.time()
        worker.send(spec)
        self.running[job.id] = worker
        self.emit(BatchEvent(EventKind.START, job))

    def _collect(self) -> None:
        """Wait up to :data:`_POLL_SECONDS` for messages or exits of the running workers, and handle them."""
        conns = {w.conn: w for w in self.running.values()}
        sentinels = {w.proc.sentinel: w for w in self.running.values()}
        for ready in wait(list(conns) + list(sentinels), timeout=_POLL_SECONDS):
            w = conns.get(ready) or sentinels.get(ready)
            if w is None or w.job is None:
                continue  # finished earlier in this round (its pipe and its exit both woke us)
            msg = None
            if ready in conns:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    msg = None
            elif w.conn.poll():
                continue  # it exited after sending: read its message first
            if msg is not None and msg[0] == EventKind.PROGRESS:
                self.emit(BatchEvent(EventKind.PROGRESS, w.job, done=msg[2], total=msg[3]))
            else:
                self._finished(w, msg)

    def _finished(self, w: Worker, msg: tuple | None) -> None:
        """A worker reported its job done or failed (``msg``), or died without a word (None)."""
        job = w.job
        assert job is not None
        job.finished = time.time()
        job.seconds = job.finished - (job.started or job.finished)
        w.job = None
        del self.running[job.id]
        if msg is not None and msg[0] == EventKind.DONE:
            job.status, job.result, job.peak_rss = Status.DONE, msg[2]["result"], msg[2]["peak_rss"]
            self.sched.release(job, True)
            self.emit(BatchEvent(EventKind.DONE, job))
            return
        self.sched.release(job, False)
        if msg is not None and msg[0] == EventKind.FAILED:
            self._fail(job, msg[2])
            return
        w.proc.join(5)
        code = w.proc.exitcode
        hint = " (killed: out of memory?)" if code == -signal.SIGKILL else ""
        shutil.rmtree(self.specs[job.id].staging, ignore_errors=True)  # the worker could not
        w.kill()
        self._fail(job, job_error(WorkerDied(f"the worker process exited with {code}{hint}")))

    def _fail(self, job: Job, error: dict[str, Any]) -> None:
        job.status, job.error = Status.FAILED, error
        self.emit(BatchEvent(EventKind.FAILED, job, error.get("message", "")))
        if not self.opts.continue_on_error:
            self.stop = True

    def _abort(self) -> None:
        """Interrupted: kill the workers, remove their staging folders, and mark what did not finish."""
        for w in self.workers:
            w.kill()
        for jid, w in list(self.running.items()):
            shutil.rmtree(self.specs[jid].staging, ignore_errors=True)
            if w.job is not None:
                w.job.status = Status.NOT_RUN
        for j in self.pending:
            j.status = Status.NOT_RUN


__all__ = ["LOCK_NAME", "BatchEvent", "BatchResult", "EventFn", "Executor", "LocalExecutor", "WorkerDied",
           "clean_stale", "job_spec", "run_batch"]
