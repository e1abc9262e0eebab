"""Admission decisions and the estimates behind them, with made-up numbers (no /proc, no models)."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_consolidate.batch.resources import (
    DISK_MARGIN,
    Scheduler,
    estimate_disk,
    estimate_output_bytes,
    meminfo,
    ram_margin,
)
from vllm_consolidate.batch.states import Admission
from vllm_consolidate.units import GIB, KIB, MIB


@dataclass
class FakeJob:
    est_peak_ram: int = GIB // 2
    est_disk_bytes: int = 0
    existing_bytes: int = 0


def _sched(*, workers: int = 4, ram: int = 5 * GIB, margin: int = GIB, disk: int | None = None,
           now: int = 64 * GIB) -> Scheduler:
    return Scheduler(workers, ram, margin, disk, available_now=lambda: now)


def test_worker_slots():
    s = _sched(workers=2)
    assert s.check(FakeJob(), 1) == Admission.GO
    assert s.check(FakeJob(), 2) == Admission.WAIT


def test_ram_budget_counts_running_estimates():
    s = _sched(ram=3 * GIB, margin=GIB)  # budget 2 GiB
    for _ in range(4):
        assert s.check(FakeJob(), 1) == Admission.GO
        s.take(FakeJob())
    assert s.ram_used == 2 * GIB and s.check(FakeJob(), 3) == Admission.WAIT
    s.release(FakeJob(), ok=True)
    assert s.check(FakeJob(), 3) == Admission.GO


def test_a_job_too_big_for_ram_runs_alone():
    s = _sched(ram=2 * GIB, margin=GIB)
    big = FakeJob(est_peak_ram=8 * GIB)
    assert s.check(big, 0) == Admission.GO
    assert s.check(big, 1) == Admission.WAIT


def test_memory_taken_outside_the_batch_holds_jobs_back():
    assert _sched(now=GIB + GIB // 2).check(FakeJob(), 1) == Admission.GO
    assert _sched(now=GIB + GIB // 4).check(FakeJob(), 1) == Admission.WAIT  # 0.25 GiB left over the margin
    assert _sched(now=0).check(FakeJob(), 0) == Admission.GO  # alone, a job always starts


def test_disk_outputs_stay_and_failures_give_back():
    s = _sched(disk=20 * GIB + DISK_MARGIN)  # budget 20 GiB
    a, b, c = FakeJob(est_disk_bytes=8 * GIB), FakeJob(est_disk_bytes=8 * GIB), FakeJob(est_disk_bytes=8 * GIB)
    s.take(a)
    s.take(b)
    assert s.check(c, 2) == Admission.WAIT and s.disk_left == 4 * GIB
    s.release(a, ok=False)  # a failed job's output is gone
    assert s.disk_used == 8 * GIB and s.check(c, 1) == Admission.GO
    s.take(c)
    s.release(b, ok=True)
    s.release(c, ok=True)
    assert s.disk_used == 16 * GIB and s.ram_used == 0
    assert s.check(FakeJob(est_disk_bytes=8 * GIB), 0) == Admission.NEVER


def test_a_replacing_job_frees_the_old_output_when_it_succeeds():
    s = _sched(disk=10 * GIB + DISK_MARGIN)
    redo = FakeJob(est_disk_bytes=6 * GIB, existing_bytes=6 * GIB)
    s.take(redo)
    s.release(redo, ok=True)
    assert s.disk_used == 0


def test_unknown_disk_is_no_limit():
    s = _sched(disk=None)
    assert s.disk_budget is None and s.disk_left == 0
    assert s.check(FakeJob(est_disk_bytes=10**15), 0) == Admission.GO


def test_disk_and_size_estimates():
    assert estimate_output_bytes(10 * MIB, 3 * KIB) == 10 * MIB + 3 * KIB + 64 * KIB
    assert estimate_disk(100 * MIB) == 100 * MIB + 64 * MIB + MIB


def test_meminfo_and_margin():
    info = meminfo()
    assert all(isinstance(v, int) for v in info.values())
    assert ram_margin() >= GIB
