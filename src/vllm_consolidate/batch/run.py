"""Running a plan: the output folder's lock and cleanup, the executor's loop, the events and the result.

A batch holds ``.vllm-consolidate-batch.lock`` (:data:`LOCK_NAME`) in the output folder (exclusive while
it cleans up, shared while it runs; workers hold it shared), and on start removes the stale
``.<name>.batch-*``, ``.<name>.old-*`` and ``.<name>.partial-*`` folders of the outputs it plans, with the
checks of a single conversion (:func:`clean_stale`: ours by marker or lock, never an input). An
object-store output prefix has a lock object and a manifest object instead (the driver records each
finished job in it), and convert cleans its own staging prefixes (:mod:`~vllm_consolidate.batch.objects`).

Failure policy: without ``continue_on_error`` the first failed job stops the batch: no new job
starts, running jobs finish (their outputs are kept), the rest are reported as not run.

Where the jobs run is the :class:`~vllm_consolidate.batch.executor.Executor`'s business
(:mod:`~vllm_consolidate.batch.executor`: the scheduling loop every executor shares, admission by the
:class:`~vllm_consolidate.batch.resources.Scheduler`, and :class:`LocalExecutor`, the default: worker
processes, at most ``--max-workers``, spawned and reused for several jobs) or
:class:`~vllm_consolidate.batch.ray_executor.RayExecutor` (one Ray task per job). The plan, the lock, the
cleanup of stale folders, the loop, the events and the result are the same for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_consolidate import __version__
from vllm_consolidate.batch.executor import (
    LOCK_NAME,
    BatchEvent,
    EventFn,
    Executor,
    LocalExecutor,
    job_manifest,
    job_spec,
)
from vllm_consolidate.batch.inputs import STAGING_TAG
from vllm_consolidate.batch.objects import ObjectOutputs
from vllm_consolidate.batch.plan import BatchPlan, Job
from vllm_consolidate.batch.states import OUTCOMES, Action, EventKind, Status
from vllm_consolidate.errors import BatchError, ConsolidateError, WorkerDied
from vllm_consolidate.write import cleanup

#: How long a batch waits for another batch on the same output folder to finish cleaning up.
LOCK_WAIT_SECONDS = 60.0


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


def clean_stale(output: Path, protect: Sequence[Path] = ()) -> list[Path]:
    """Remove leftovers of killed runs for one output: the single cleaner's rules
    (:func:`~vllm_consolidate.write.cleanup.clean_stale`) with the batch's ``.<name>.batch-*`` staging
    folders, and never an input in ``protect``. The caller holds the batch lock exclusively. Returns
    what was removed."""
    return cleanup.clean_stale(output, protect, staging_tags=(STAGING_TAG,))


def _protected(plan: BatchPlan) -> list[Path]:
    """Every job's input, checkpoint and weights folder: cleanup never touches them, whatever their names."""
    found = [p for j in plan.jobs for p in (j.input, j.checkpoint, j.detected.get("weights_dir")) if p]
    return [Path(p) for p in dict.fromkeys(found)]


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
    runs = pending and not (plan.problems and not plan.options.continue_on_error)
    if runs and plan.objects is not None:  # no local folder, lock or cleanup: the store's (batch.objects)
        with executor.session(), plan.objects.lock():
            pending = executor.run(plan, _recording(plan, plan.objects, emit), plan.objects.url, pending)
    elif runs:
        out_dir = Path(plan.options.output_dir).absolute()
        with executor.session():
            out_dir.mkdir(parents=True, exist_ok=True)
            with _batch_lock(out_dir) as lock_fd:
                protect = _protected(plan)
                for j in plan.jobs:
                    clean_stale(j.output, protect)
                fcntl.flock(lock_fd, fcntl.LOCK_SH)  # cleaned up: other readers may look now; workers share it
                pending = executor.run(plan, emit, out_dir, pending)
    for j in pending:
        j.status = Status.NOT_RUN
        emit(BatchEvent(EventKind.NOT_RUN, j))
    return BatchResult(plan, started, time.time(), executor.name, dict(executor.info), dict(executor.job_info))


def _recording(plan: BatchPlan, objects: ObjectOutputs, emit: EventFn) -> EventFn:
    """``emit``, recording each finished job in the object-store batch manifest first (the driver's one PUT)."""

    def on_event(ev: BatchEvent) -> None:
        if ev.kind == EventKind.DONE:
            try:
                objects.record(ev.job.output.name, job_manifest(ev.job, plan.options), ev.job.result or {})
            except ConsolidateError as exc:  # the output is committed; a rerun redoes it ("not recorded")
                plan.notes.append(f"{ev.job.output.name}: not recorded in the batch manifest ({exc})")
        emit(ev)
    return on_event


__all__ = ["LOCK_NAME", "BatchEvent", "BatchResult", "EventFn", "Executor", "LocalExecutor", "WorkerDied",
           "clean_stale", "job_spec", "run_batch"]
