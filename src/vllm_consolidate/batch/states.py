"""The words a batch reports in: job actions, job statuses, event kinds and admission decisions.

Each is an :class:`enum.Enum` whose members are also the ``str`` of their value, so a member is
written to JSON, compared with, and printed exactly as the plain word was before (``"convert"``,
``"done"``...): reports and tables do not change, and ``Action.SKIP == "skip"`` holds.
"""

from __future__ import annotations

from vllm_consolidate.source import Word as _Word


class Action(_Word):
    """What the plan does with a job's output."""

    CONVERT = "convert"  # no output yet
    REPLACE = "replace"  # stale, or --force: redone and renamed over the old one once complete
    SKIP = "skip"  # up to date
    BLOCKED = "blocked"  # the output exists and is not this job's to replace
    ERROR = "error"  # planning failed


class Status(_Word):
    """Where a job is; the last four are the outcomes a run reports."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    NOT_RUN = "not_run"


#: The outcomes, in the order reports count them.
OUTCOMES = (Status.DONE, Status.SKIPPED, Status.FAILED, Status.NOT_RUN)


class EventKind(_Word):
    """What a :class:`~vllm_consolidate.batch.executor.BatchEvent` says happened to a job."""

    START = "start"
    PROGRESS = "progress"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    NOT_RUN = "not_run"
    WAITING = "waiting"  # for RAM or disk


class Admission(_Word):
    """The scheduler's answer for the next job."""

    GO = "go"
    WAIT = "wait"  # until a running job finishes
    NEVER = "never"  # does not fit on the disk even with nothing running


__all__ = ["OUTCOMES", "Action", "Admission", "EventKind", "Status"]
