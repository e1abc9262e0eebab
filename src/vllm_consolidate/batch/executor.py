"""Where a batch's jobs run: the scheduling loop every executor shares, and this machine's worker processes.

:class:`Executor` is the one loop (:meth:`Executor.run`): admission by the
:class:`~vllm_consolidate.batch.resources.Scheduler`, the failure policy, outcomes, interruption and the
:class:`BatchEvent` s. A subclass says how one job runs through the loop's hooks: :class:`LocalExecutor`
(the default: spawned worker processes, at most ``--max-workers``, reused for several jobs) or
:class:`~vllm_consolidate.batch.ray_executor.RayExecutor` (one Ray task per job). What a started job
gets is :func:`job_spec`. Everything around the loop (the output folder's lock and cleanup, the object-store
manifest, the result) is :func:`~vllm_consolidate.batch.run.run_batch`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from vllm_consolidate.batch.inputs import staging_path
from vllm_consolidate.batch.manifest import content_options, manifest_base
from vllm_consolidate.batch.objects import public_path
from vllm_consolidate.batch.plan import BatchOptions, BatchPlan, Job, job_error
from vllm_consolidate.batch.resources import Scheduler
from vllm_consolidate.batch.states import Action, Admission, EventKind, Status
from vllm_consolidate.batch.worker import JobSpec, Worker, clear_attempt
from vllm_consolidate.errors import InsufficientDiskError, WorkerDied
from vllm_consolidate.storage.urls import ObjectURL

#: The batch lock file in a local output folder (see :mod:`~vllm_consolidate.batch.run`); every job holds it shared.
LOCK_NAME = ".vllm-consolidate-batch.lock"
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

def job_manifest(job: Job, opts: BatchOptions) -> dict[str, Any]:
    """The plan's part of ``job``'s manifest (URLs for an object-store input)."""
    return manifest_base(input=job.input, checkpoint=job.checkpoint or job.input,
                         checkpoint_name=job.checkpoint_name, step=job.step, detected=job.detected,
                         sources=job.sources, options=content_options(opts.model))


def job_spec(job: Job, opts: BatchOptions) -> JobSpec:
    """What a worker needs for ``job``: the options record (writing into a fresh staging folder) and the manifest.

    An object-store input is named by its URLs (a worker never sees the driver's mirror); an object-store
    output is the job's output URL itself (convert stages and commits it), replaced only when the plan
    said so (``force``: our marker is checked again by convert).
    """
    inp = public_path(job.input)
    checkpoint = public_path(job.checkpoint) if job.checkpoint is not None else None
    remote_in = inp != str(Path(job.input).absolute())
    source = (inp, checkpoint) if remote_in else (job.input, job.checkpoint)
    if isinstance(job.output, ObjectURL):
        options = dataclasses.replace(opts.job_options(input=source[0], output=str(job.output),  # type: ignore[arg-type]
                                                       checkpoint_dir=source[1]), force=job.action == Action.REPLACE)
        return JobSpec(job.id, options, str(job.output), {}, opts.debug)  # type: ignore[arg-type]
    # force: the staging folder is new and the job's own; whether the real output may be replaced was decided
    # while planning, and publish() replaces it.
    options = dataclasses.replace(
        opts.job_options(input=source[0], output=staging_path(job.output),  # type: ignore[arg-type]
                         checkpoint_dir=source[1]), force=True)
    return JobSpec(job.id, options, job.output, job_manifest(job, opts), opts.debug)


class Executor:
    """Where a plan's jobs run, and the one scheduling loop every executor shares.

    :meth:`run` admits the pending jobs in order (``--max-workers`` and the scheduler's RAM and disk
    budgets), starts them, collects their outcomes, stops starting jobs after the first failure
    (unless ``continue_on_error``), reports through ``emit`` and returns the jobs never started. A
    subclass says how a job runs through the hooks :meth:`_open`, :meth:`_launch`, :meth:`_poll`,
    :meth:`_discard`, :meth:`_halt`, :meth:`_close` and (optionally) :meth:`_stopping`; its :meth:`_poll`
    hands each ended job to :meth:`_settle` and, when the job's worker died without a word, to :meth:`_died`.

    :meth:`session` is entered before the output folder is locked and cleaned (to connect to a cluster,
    so a connection error comes before anything is touched); :attr:`job_info` adds fields to each
    job's record in the report (e.g. Ray's attempts and nodes), :attr:`info` to the report's
    ``executor`` record. The loop's state (the attributes annotated below) lives on the executor for
    the length of one :meth:`run`.
    """

    name = "local"

    opts: BatchOptions
    emit: EventFn
    out_dir: Path | ObjectURL
    pending: list[Job]
    sched: Scheduler
    running: dict[int, Job]  # started (or submitted) and not yet ended, in start order
    specs: dict[int, JobSpec]
    waiting_noted: set[int]
    stop: bool  # a job failed without continue_on_error: start no more

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.job_info: dict[int, dict[str, Any]] = {}

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield

    def run(self, plan: BatchPlan, emit: EventFn, out_dir: Path | ObjectURL, pending: list[Job]) -> list[Job]:
        """Start and collect jobs until none is left or the batch stops; return the jobs never started.

        Raises:
            BaseException: Whatever interrupted the loop (Ctrl-C, SIGTERM, a lost cluster), after
                :meth:`_abort` stopped the running jobs and marked what did not finish.
        """
        self.opts, self.emit, self.out_dir, self.pending = plan.options, emit, out_dir, pending
        # The local lock file (held shared by every job); an object-store output has its lock object instead.
        self.lock_path = str(out_dir / LOCK_NAME) if isinstance(out_dir, Path) else None
        self.running, self.specs, self.waiting_noted, self.stop = {}, {}, set(), False
        self.sched = self._open(plan)
        try:
            while self.pending or self.running:
                self._admit()
                if not self.running:
                    break
                self._poll()
            return self.pending
        except BaseException:
            self._abort()
            raise
        finally:
            self._close()

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
                continue
            spec = self.specs[job.id] = job_spec(job, self.opts)
            self.sched.take(job)
            # Counted as running before it is launched, so that an interrupt in between still aborts it.
            self.running[job.id] = job
            self._launch(job, spec)

    def _settle(self, job: Job, outcome: tuple | None, finished: float) -> bool:
        """A job ended with its worker's DONE or FAILED message (``outcome``), or without one (None).

        Returns:
            False when there is no outcome (the worker died): the caller then reports it with :meth:`_died`.
        """
        del self.running[job.id]
        job.finished = finished
        job.seconds = job.finished - (job.started or job.finished)
        if outcome is not None and outcome[0] == EventKind.DONE:
            job.status, job.result, job.peak_rss = Status.DONE, outcome[2]["result"], outcome[2]["peak_rss"]
            self.sched.release(job, True)
            self.emit(BatchEvent(EventKind.DONE, job))
            return True
        self.sched.release(job, False)
        if outcome is not None:
            self._fail(job, outcome[2])
            return True
        return False

    def _died(self, job: Job, message: str) -> None:
        """Fail a settled job whose worker ended without reporting, after removing its staging folder."""
        self._discard(job)  # the worker could not
        self._fail(job, job_error(WorkerDied(message)))

    def _fail(self, job: Job, error: dict[str, Any]) -> None:
        job.status, job.error = Status.FAILED, error
        self.emit(BatchEvent(EventKind.FAILED, job, error.get("message", "")))
        if not self.opts.continue_on_error and not self.stop:
            self.stop = True
            self._stopping()

    def _abort(self) -> None:
        """Interrupted: stop every job now, remove their staging folders, and mark what did not finish."""
        self._halt()
        for job in self.running.values():
            self._discard(job)
            job.status = Status.NOT_RUN
        for job in self.pending:
            job.status = Status.NOT_RUN

    # -- the hooks ----------------------------------------------------------------------------------------

    def _open(self, plan: BatchPlan) -> Scheduler:
        """Prepare a run (the loop's state is set); return the scheduler that admits its jobs."""
        raise NotImplementedError

    def _launch(self, job: Job, spec: JobSpec) -> None:
        """Start (or submit) an admitted job; emit START once it runs."""
        raise NotImplementedError

    def _poll(self) -> None:
        """Wait a little for news of the running jobs: emit progress, :meth:`_settle` the ended ones."""
        raise NotImplementedError

    def _discard(self, job: Job) -> None:
        """Remove the staging folder of a job that will not publish."""
        raise NotImplementedError

    def _halt(self) -> None:
        """Interrupted: stop every running job now (the loop then discards and marks them)."""
        raise NotImplementedError

    def _close(self) -> None:
        """The run is over (done or interrupted): release what :meth:`_open` and :meth:`_launch` took."""

    def _stopping(self) -> None:
        """The batch just stopped starting jobs (a failure without continue_on_error)."""


class LocalExecutor(Executor):
    """This machine's worker processes, admitted by the plan's RAM and disk scheduler (``--executor local``).

    Workers are spawned as needed (at most ``--max-workers``) and reused for later jobs.
    """

    def _open(self, plan: BatchPlan) -> Scheduler:
        self.ctx = multiprocessing.get_context("spawn")  # fork would copy the caller's threads and locks
        self.workers: list[Worker] = []
        return plan.scheduler()

    def _launch(self, job: Job, spec: JobSpec) -> None:
        worker = next((w for w in self.workers if w.idle), None)
        if worker is None:
            worker = Worker(self.ctx, self.lock_path)
            self.workers.append(worker)
        worker.job = job
        job.status, job.started = Status.RUNNING, time.time()
        worker.send(spec)
        self.emit(BatchEvent(EventKind.START, job))

    def _poll(self) -> None:
        """Wait up to :data:`_POLL_SECONDS` for messages or exits of the running workers, and handle them."""
        busy = {w.job.id: w for w in self.workers if w.job is not None}
        running = [busy[jid] for jid in self.running]
        conns = {w.conn: w for w in running}
        sentinels = {w.proc.sentinel: w for w in running}
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
        w.job = None
        if self._settle(job, msg, time.time()):
            return
        w.proc.join(5)
        code = w.proc.exitcode
        hint = " (killed: out of memory?)" if code == -signal.SIGKILL else ""
        w.kill()
        self._died(job, f"the worker process exited with {code}{hint}")

    def _discard(self, job: Job) -> None:
        clear_attempt(self.specs[job.id])  # a SIGKILLed worker also leaves convert()'s .partial-*

    def _halt(self) -> None:
        for w in self.workers:
            w.kill()  # SIGTERM: each removes its own staging folder too

    def _close(self) -> None:
        for w in self.workers:
            w.stop()

__all__ = ["LOCK_NAME", "BatchEvent", "EventFn", "Executor", "LocalExecutor", "job_manifest", "job_spec"]
