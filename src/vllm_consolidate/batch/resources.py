"""What a job needs (RAM, disk), what the machine has, and the scheduler that admits jobs against it.

Each job runs in a worker process (at most ``--max-workers``). A job's needs come from metadata:
disk = the output's bytes (tensor count x output dtype size, plus config/tokenizer files) + 64 MiB +
1 %; RAM = :func:`~vllm_consolidate.write.estimates.estimate_peak_ram` (interpreter, torch, metadata,
the writer's buffers, an object-store input's read-ahead, an object-store output's upload buffers). A job
is started only when (a) the RAM estimates of the running jobs plus this one fit in ``MemAvailable`` at batch
start minus :func:`ram_margin` (max(1 GiB, 10 % of MemTotal)), (b) ``MemAvailable`` *now* minus the margin still
covers this job, and (c) the disk estimates of every job started so far (outputs stay on disk) plus
this one fit in the output file system's free space at batch start minus :data:`DISK_MARGIN`. A job
that does not fit even with nothing running: RAM -> it runs alone; disk -> it fails with "not enough
disk space".
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vllm_consolidate.batch.states import Admission
from vllm_consolidate.units import GIB, KIB, MIB
from vllm_consolidate.write.estimates import JOB_BASE_RSS, PER_TENSOR_RSS, estimate_peak_ram

#: Free disk the batch never plans to use.
DISK_MARGIN = 1 * GIB
#: Room for the config/tokenizer files' own metadata, and a staged output's fixed overhead on disk.
_ASSET_SLACK = 64 * KIB
_DISK_SLACK = 64 * MIB
#: ``MemAvailable`` when it cannot be read (off Linux): large enough never to hold a job back.
_UNKNOWN_RAM = 1 << 50


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def mem_available() -> int:
    """``MemAvailable`` in bytes (a large number when unknown)."""
    return meminfo().get("MemAvailable", _UNKNOWN_RAM)


def ram_margin() -> int:
    """RAM kept free for everything else: max(1 GiB, 10 % of MemTotal)."""
    return max(GIB, meminfo().get("MemTotal", 0) // 10)


def disk_free(folder: Path) -> int | None:
    """Free bytes on the file system that will hold ``folder`` (its nearest existing parent), None if unknown."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    with contextlib.suppress(OSError):
        return shutil.disk_usage(probe).free
    return None


def estimate_output_bytes(plan_bytes: int, asset_bytes: int) -> int:
    """An output's size: the planned weight files, the config/tokenizer files copied, and their slack."""
    return plan_bytes + asset_bytes + _ASSET_SLACK


def estimate_disk(output_bytes: int) -> int:
    """Disk a job may use while it runs: its output + 64 MiB + 1 % (file system overhead, the manifest)."""
    return output_bytes + _DISK_SLACK + output_bytes // 100


class Needs(Protocol):
    """What the scheduler reads of a job (a :class:`~vllm_consolidate.batch.plan.Job`)."""

    est_peak_ram: int
    est_disk_bytes: int
    existing_bytes: int  # the old output a replacing job frees when it succeeds


class Scheduler:
    """Admits jobs against RAM and disk budgets (see the module docstring).

    Args:
        max_workers: Most jobs at once.
        ram_available: ``MemAvailable`` at batch start.
        ram_margin: RAM kept free for everything else.
        disk_free: Free bytes on the output file system at batch start; None when unknown (no disk limit).
        available_now: Reads ``MemAvailable`` now; tests give a fake.
    """

    def __init__(self, max_workers: int, ram_available: int, ram_margin: int, disk_free: int | None,
                 available_now: Callable[[], int] = mem_available):
        self.max_workers = max_workers
        self.margin = ram_margin
        self.ram_budget = ram_available - ram_margin
        self.disk_budget = (disk_free - DISK_MARGIN) if disk_free is not None else None
        self.ram_used = 0
        self.disk_used = 0
        self._available_now = available_now

    @property
    def disk_left(self) -> int:
        """Disk bytes the batch may still plan to use (0 when unknown)."""
        return (self.disk_budget or 0) - self.disk_used

    def check(self, job: Needs, running: int) -> Admission:
        """Whether ``job`` may start now, with ``running`` jobs running."""
        if running >= self.max_workers:
            return Admission.WAIT
        if self.disk_budget is not None and self.disk_used + job.est_disk_bytes > self.disk_budget:
            # Outputs stay on disk, so only a failing running job could make room; with none running, nothing will.
            return Admission.NEVER if running == 0 else Admission.WAIT
        if running == 0:
            return Admission.GO  # a job too big for the RAM budget still runs, alone
        if self.ram_used + job.est_peak_ram > self.ram_budget:
            return Admission.WAIT
        if self._available_now() - self.margin < job.est_peak_ram:
            return Admission.WAIT  # something outside the batch took the memory
        return Admission.GO

    def take(self, job: Needs) -> None:
        """Count a started job's needs."""
        self.ram_used += job.est_peak_ram
        self.disk_used += job.est_disk_bytes

    def release(self, job: Needs, ok: bool) -> None:
        """Give back a finished job's RAM; its disk too if it failed (a success keeps its output but frees the old)."""
        self.ram_used -= job.est_peak_ram
        self.disk_used -= job.est_disk_bytes if not ok else job.existing_bytes


__all__ = ["DISK_MARGIN", "JOB_BASE_RSS", "PER_TENSOR_RSS", "Needs", "Scheduler", "disk_free", "estimate_disk",
           "estimate_output_bytes", "estimate_peak_ram", "mem_available", "meminfo", "ram_margin"]
