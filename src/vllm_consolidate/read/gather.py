"""Reading many small byte ranges that are few runs per file: one read per run, then a scatter in memory.

Under tensor parallelism a row-parallel weight (Megatron's ``linear_proj`` and ``linear_fc2``, split by
column) is stored as one block per rank file, so the full tensor's rows alternate between files every
half row: about 86k ranges of 1.8 KB for a 0.5B model at TP=2. Read range by range, that is one system
call each (``copy_file_range`` or ``preadv``), and the calls, not the bytes, set the time. Yet each file's
ranges are adjacent on disk. :func:`plan_gather` finds those runs (one pass over the ranges);
:func:`read_gathered` reads each run with one call into a scratch buffer and moves its pieces into place:
one strided numpy copy per run when its pieces are of one length at evenly spaced places (the TP case,
so no Python work per range), else a slice copy per range.

Built on :func:`~vllm_consolidate.read.ranges.read_into`, so it reads whatever that reads. Memory: one
scratch buffer the size of the destination, per thread, reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_consolidate.read.ranges import OpenFiles, read_into, thread_buffer
from vllm_consolidate.source import Segment

#: Gather only when it saves at least this many reads per run (fewer: read each range in place).
MIN_RANGES_PER_RUN = 4
#: Ranges at most this long on average are worth gathering; longer ones cost their bytes, not their calls.
SMALL_RANGE_BYTES = 64 * 2**10


@dataclass
class Gather:
    """Where a list of ranges comes from, per file run.

    Attributes:
        segments: The ranges, in destination order.
        runs: The runs of adjacent bytes per file they form, in first-use order.
        where: Per range, ``(run index, byte offset in the run)``.
        steps: Per run, ``(first destination byte, destination stride, range length, ranges)`` when its ranges
            are of one length at evenly spaced destinations, else None.
    """

    segments: Sequence[Segment]
    runs: list[Segment]
    where: list[tuple[int, int]]
    steps: list[tuple[int, int, int, int] | None]

    @property
    def worth_it(self) -> bool:
        """Many small ranges in few runs: gathering saves calls."""
        n = len(self.segments)
        return n >= MIN_RANGES_PER_RUN * len(self.runs) and sum(r.nbytes for r in self.runs) <= SMALL_RANGE_BYTES * n


def plan_gather(segments: Sequence[Segment]) -> Gather:
    """The runs ``segments`` form (a range extends its file's latest run when it starts where that run ends)."""
    open_run: dict[str, int] = {}
    runs: list[list] = []  # [path, offset, length, first dst, dst stride, range length, count, evenly spaced]
    where: list[tuple[int, int]] = []
    pos = 0
    for seg in segments:
        r = open_run.get(seg.path)
        run = runs[r] if r is not None else None
        if run is not None and run[1] + run[2] == seg.offset:
            where.append((r, run[2]))
            run[2] += seg.nbytes
            if run[7]:
                stride = pos - (run[3] + (run[6] - 1) * run[4]) if run[6] > 1 else pos - run[3]
                run[7] = seg.nbytes == run[5] and stride == run[4] if run[6] > 1 else seg.nbytes == run[5]
                run[4] = stride
            run[6] += 1
        else:
            open_run[seg.path] = r = len(runs)
            runs.append([seg.path, seg.offset, seg.nbytes, pos, 0, seg.nbytes, 1, True])
            where.append((r, 0))
        pos += seg.nbytes
    return Gather(segments, [Segment(r[0], r[1], r[2]) for r in runs], where,
                  [(r[3], r[4], r[5], r[6]) if r[7] else None for r in runs])


def read_gathered(files: OpenFiles, buf: memoryview, segments: Sequence[Segment], plan: Gather | None = None) -> None:
    """Fill ``buf`` with the concatenation of ``segments``, like ``read_into``, reading each per-file run of
    adjacent ranges with one call when that saves calls (see the module docstring).

    Args:
        files: Open source files.
        buf: The destination, exactly the ranges' total length.
        segments: The ranges.
        plan: :func:`plan_gather` of ``segments``, when the caller has it already.

    Raises:
        CorruptCheckpointError: A file ends before its range does.
    """
    plan = plan_gather(segments) if plan is None else plan
    if not plan.worth_it:
        read_into(files, buf, iter(segments))
        return
    import numpy as np  # only here: a plain copy never needs numpy

    scratch = thread_buffer(len(buf), "gather")
    read_into(files, scratch, iter(plan.runs))
    base, pos = [], 0
    for run in plan.runs:
        base.append(pos)
        pos += run.nbytes
    dst = np.frombuffer(buf, dtype=np.uint8)
    src = np.frombuffer(scratch, dtype=np.uint8)
    for r, step in enumerate(plan.steps):
        if step is not None:
            first, stride, length, count = step
            view = np.lib.stride_tricks.as_strided(dst[first:], shape=(count, length), strides=(stride, 1))
            view[...] = src[base[r]:base[r] + count * length].reshape(count, length)
    if all(step is not None for step in plan.steps):
        return
    pos = 0
    for seg, (r, off) in zip(plan.segments, plan.where):
        if plan.steps[r] is None:
            start = base[r] + off
            buf[pos:pos + seg.nbytes] = scratch[start:start + seg.nbytes]
        pos += seg.nbytes


__all__ = ["MIN_RANGES_PER_RUN", "SMALL_RANGE_BYTES", "Gather", "plan_gather", "read_gathered"]
