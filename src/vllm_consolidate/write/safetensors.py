"""Stream planned tensors from their source byte ranges into their slots in the output files.

Every tensor is copied in chunks of at most :data:`CHUNK_BYTES` (:data:`CAST_CHUNK_BYTES` of source
bytes when it is cast):

* same dtype in and out: the kernel copies the bytes (``os.copy_file_range``), so they never pass
  through Python and are bit-exact;
* a dtype change: a chunk is read with ``os.preadv`` into a reused buffer, cast by
  :func:`~vllm_consolidate.casts.cast_into` (round to nearest even, bit-identical to torch's
  ``Tensor.to``, and element-wise, so chunking changes nothing) and written with ``os.pwrite`` at its
  final offset.

Chunks are independent (they write disjoint ranges), so two threads run them: the cast and the
system calls release the GIL, which overlaps reading, converting and writing on two cores. Peak
memory is a few chunk buffers, whatever the model or tensor size.

Each file is fsynced before the folder is published (a crash must not leave a published model with
holes). To keep that from costing a second pass at the end, every written chunk is handed to the
kernel's writeback at once (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux): the disk writes while
we copy, and the final fsync finds little left. On the 0.5B benchmark (``bench/writer_ab.py``) the
fp32 conversion took 1.70-1.76 s with it and 2.04-2.57 s without, and bf16 1.13 s against 1.47 s.

The output is a local file descriptor, or an object store's :class:`~vllm_consolidate.storage.upload.ObjectSink`
(``--output s3://…``): the same jobs, the same offsets; a plain copy then goes through a buffer (the kernel
cannot copy into a network upload) and the sink turns the positional writes into one multipart upload.

We read with positional reads rather than ``mmap``: both read only the bytes we ask for (Adam
moments are never touched), but mapped pages count toward the process's RSS on a shared box.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.formats.safetensors import HeaderEntry, header_bytes
from vllm_consolidate.plan.lora_rows import merged_rows, row_length
from vllm_consolidate.plan.shards import PlannedFile, PlannedTensor
from vllm_consolidate.read.gather import MIN_RANGES_PER_RUN, SMALL_RANGE_BYTES, Gather, plan_gather, read_gathered
from vllm_consolidate.read.ranges import OpenFiles, check_read, thread_buffer
from vllm_consolidate.source import Segment, TensorSpec, sub_segments
from vllm_consolidate.storage.bytefile import ByteFile, LocalFile
from vllm_consolidate.write.pwrite import Out, pwrite_all

CHUNK_BYTES = 16 * 2**20
# Smaller chunks for casts keep a chunk and its result near the core's cache: on the 0.5B benchmark
# the bf16 conversion took 1.13 s with 4 MiB chunks and 1.59 s with 16 MiB ones (bench/writer_ab.py).
CAST_CHUNK_BYTES = 4 * 2**20
#: Chunks of a same-dtype tensor stored as many small ranges (a TP row-parallel weight), which pass through memory
#: (read by file run, interleaved, written): small enough to stay in the core's cache between the three copies. On
#: the 0.5B Megatron benchmark (TP=2, fp32 out) the pwrites of its 470 MB took 1.0-1.15 s of CPU from 16 MiB buffers
#: and 0.16-0.17 s from 2 MiB ones (issue 24); the kernel's copy of the other 1.5 GB took ~0.8 s.
GATHER_CHUNK_BYTES = 2 * 2**20
WORKERS = 2
#: Source bytes asked for ahead of the chunk being submitted (``posix_fadvise(WILLNEED)``, or background GETs for
#: an object-store source), so the next chunks are read while the workers cast and write this one (0: none).
READ_AHEAD_BYTES = 64 * 2**20

ProgressFn = Callable[[int], None]


def chunk_elements(src: DType, dst: DType, gathered: bool = False) -> int:
    """Elements per chunk when a tensor of ``src`` is streamed as ``dst`` (a copy or a cast); ``gathered``: its
    source is many small ranges, so even a plain copy passes through a buffer (:func:`is_gathered`)."""
    budget = CAST_CHUNK_BYTES if src != dst else GATHER_CHUNK_BYTES if gathered else CHUNK_BYTES
    return max(1, budget // max(src.itemsize, dst.itemsize))


def job_elements(t: PlannedTensor) -> int:
    """Elements per job of ``t`` (:func:`_jobs`): a chunk (:func:`chunk_elements`), or for a LoRA merge whole rows
    of about :data:`CAST_CHUNK_BYTES` in float32 (at least one row)."""
    if t.spec.delta is not None:
        cols = row_length(t.spec)
        return max(1, CAST_CHUNK_BYTES // (4 * cols)) * cols
    return chunk_elements(t.spec.dtype, t.out_dtype, is_gathered(t.spec))


def job_buffers(t: PlannedTensor) -> dict[str, int]:
    """The most each per-thread buffer of :func:`_run_job` takes for a job of ``t``, by kind (the
    :func:`~vllm_consolidate.read.ranges.thread_buffer` slots, and ``merged``: a LoRA merge's float32 rows); a
    writer thread keeps each slot at the largest size it was asked for. An upper bound from the chunk size and the
    range count, without cutting the tensor's ranges into its jobs (thousands of ranges a tensor under TP).

    ``src`` holds a job's source bytes unless the kernel copies them: a same-dtype job goes through it only when its
    ranges average at most ``SMALL_RANGE_BYTES`` (or the output is an object store); ``gather`` is the scratch copy
    of a read of many small ranges; ``dst`` a cast's result; ``copy`` a plain copy's bytes when the kernel cannot
    copy (an object-store input, a file system refusing ``copy_file_range``): counted, since a plan cannot know.
    """
    src, out = t.spec.dtype, t.out_dtype
    count = min(t.spec.numel, job_elements(t))
    chunk = count * src.itemsize
    ranges = len(t.spec.segments)
    through_src = chunk if src != out or t.spec.delta is not None else min(chunk, SMALL_RANGE_BYTES * ranges)
    return {
        "src": through_src,
        "gather": through_src if ranges >= MIN_RANGES_PER_RUN else 0,  # plan_gather's runs need this many ranges
        "dst": count * out.itemsize if out != (dtypes.float32 if t.spec.delta is not None else src) else 0,
        "copy": min(chunk, CHUNK_BYTES) if src == out and t.spec.delta is None and chunk > SMALL_RANGE_BYTES else 0,
        "merged": count * 4 if t.spec.delta is not None else 0,  # a merge's float32 rows (plan.lora_rows)
    }


def is_gathered(spec: TensorSpec) -> bool:
    """Whether ``spec``'s ranges are so small on average that they are read by file run and interleaved in memory
    rather than copied by the kernel range by range (the test :func:`_run_job` makes per chunk)."""
    return spec.nbytes <= SMALL_RANGE_BYTES * len(spec.segments)


@dataclass
class _Job:
    tensor: PlannedTensor
    first: int  # first element of the chunk
    count: int
    dst_offset: int  # absolute offset in the output file of the chunk's first byte
    segments: Sequence[Segment]  # its source ranges, cut once for the whole tensor by ``_jobs`` (``_cut``)
    gather: Gather | None = None  # its source ranges by file run, found once by the read-ahead (``_advise``)

    def ranges(self) -> Sequence[Segment]:
        return self.gather.segments if self.gather is not None else self.segments


def _copy_bytes(files: OpenFiles, out_fd: int, segs: Iterator[Segment], dst: int) -> int:
    done = 0
    for seg in segs:
        src = files.get(seg.path)
        src_fd = src.fd if isinstance(src, LocalFile) else None
        off, left = seg.offset, seg.nbytes
        while left:
            n = None
            if src_fd is not None:  # two local files: the kernel copies
                try:
                    n = os.copy_file_range(src_fd, out_fd, left, off, dst + done)
                except OSError:
                    n = None
            if n is None:  # an object-store source, or a file system that refuses copy_file_range
                n = _copy_fallback(src, out_fd, left, off, dst + done)
            if n == 0:
                check_read(seg.nbytes - left, seg.nbytes, seg)
            off += n
            left -= n
            done += n
    return done


def _copy_fallback(src: ByteFile, out_fd: int, count: int, offset: int, dst: int) -> int:
    """Read up to one chunk and write it; 0 at the end of the source."""
    view = thread_buffer(min(count, CHUNK_BYTES), "copy")
    got = src.preadv_into(view, offset)
    return pwrite_all(out_fd, view[:got], dst) if got else 0


def _cast(src: memoryview, src_dtype: DType, dst_dtype: DType, count: int) -> memoryview:
    """Cast ``count`` elements into the thread's output buffer."""
    from vllm_consolidate.casts import cast_into  # numpy is not needed (nor imported) by a plain copy

    out = thread_buffer(count * dst_dtype.itemsize, "dst")
    cast_into(src, src_dtype, dst_dtype, out)
    return out


_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        # The process's own symbols, libc's among them: ``ctypes.util.find_library("c")`` would run ``ldconfig -p``
        # in a subprocess (2-6 ms and ``subprocess``'s import, per conversion) to name the same library.
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


# Looked up on the first write, not at import: commands that import this module without writing (``inspect``) need
# neither ctypes nor the lookup.
_NOT_LOADED: Any = object()
_sync_file_range: Any = _NOT_LOADED


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` to disk now, without waiting for it.

    A hint only: where ``sync_file_range`` is missing or fails, the final fsync does all the work.
    """
    global _sync_file_range
    if _sync_file_range is _NOT_LOADED:  # two threads may both load it: the same function, harmlessly
        _sync_file_range = _load_sync_file_range()
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _run_job(files: OpenFiles, out_fd: Out, job: Any) -> int:
    if not isinstance(job, _Job):  # --quantize: a block of rows of a weight and its scales
        from vllm_consolidate.write.quantize import run_quant_job

        return run_quant_job(files, out_fd, job)
    t = job.tensor
    src_dtype = t.spec.dtype
    src_bytes = job.count * src_dtype.itemsize
    ranges = job.ranges()
    if t.spec.delta is not None:  # a LoRA merge: base rows + (B @ A) * scale, in float32, then cast
        buf = thread_buffer(src_bytes)
        read_gathered(files, buf, ranges, job.gather)
        cols = row_length(t.spec)
        merged = merged_rows(t.spec, job.first // cols, job.count // cols, buf)
        data = merged if t.out_dtype == dtypes.float32 else _cast(merged, dtypes.float32, t.out_dtype, job.count)
        written = pwrite_all(out_fd, data, job.dst_offset)
    elif src_dtype == t.out_dtype and isinstance(out_fd, int) and src_bytes > SMALL_RANGE_BYTES * len(ranges):
        written = _copy_bytes(files, out_fd, iter(ranges), job.dst_offset)
    else:  # a cast, many small ranges (a TP row-parallel weight), or an object-store output: gathered, one write
        buf = thread_buffer(src_bytes)
        read_gathered(files, buf, ranges, job.gather)
        data = buf if src_dtype == t.out_dtype else _cast(buf, src_dtype, t.out_dtype, job.count)
        written = pwrite_all(out_fd, data, job.dst_offset)
    if isinstance(out_fd, int):
        start_writeback(out_fd, job.dst_offset, written)
    return written



def _jobs(pfile: PlannedFile, base: int) -> Iterator[Any]:
    scales = {id(t.scale) for t in pfile.tensors if t.scale is not None}
    for t in pfile.tensors:
        if t.quant is not None:  # --quantize: the weight's jobs write its scale too
            from vllm_consolidate.write.quantize import quant_jobs

            yield from quant_jobs(t, base)
            continue
        if id(t) in scales:
            continue
        step = job_elements(t)
        size = t.spec.dtype.itemsize
        for first, segments in zip(range(0, t.spec.numel, step), _cut(t.spec.segments, step * size)):
            count = min(step, t.spec.numel - first)
            yield _Job(t, first, count, base + t.offset + first * t.out_dtype.itemsize, segments=segments)


def _cut(segments: list[Segment], nbytes: int) -> Iterator[Sequence[Segment]]:
    """The ranges of each consecutive ``nbytes`` of the concatenation of ``segments`` (the last may be shorter), in
    one pass: ``sub_segments`` per chunk scans from the first range, quadratic in a TP weight's thousands of ranges.
    Ranges a chunk holds whole are the tensor's own objects; a tensor of one chunk is its own list."""
    total = sum(seg.nbytes for seg in segments)
    if total <= nbytes:
        yield segments
        return
    out: list[Segment] = []
    room = nbytes
    for seg in segments:
        offset, left = seg.offset, seg.nbytes
        while left:
            take = min(left, room)
            out.append(seg if take == seg.nbytes else Segment(seg.path, offset, take))
            offset, left, room = offset + take, left - take, room - take
            if not room:
                yield out
                out, room = [], nbytes
    if out:
        yield out


def _advise(files: OpenFiles, job: Any) -> int:
    """Ask the kernel to start reading ``job``'s source bytes; returns how many."""
    t = job.tensor
    if isinstance(job, _Job):
        # Found once here (the main thread) and kept for the worker that runs the job.
        job.gather = plan = plan_gather(job.ranges())
        runs, nbytes = plan.runs, job.count * t.spec.dtype.itemsize
    else:  # --quantize: a block of whole rows
        cols, size = row_length(t.spec), t.spec.dtype.itemsize
        nbytes = job.rows * cols * size
        runs = plan_gather(list(sub_segments(t.spec.segments, job.first * cols * size, nbytes))).runs
    # One call per run of adjacent bytes in a file, not per segment: a Megatron row-parallel weight under TP=2
    # alternates its two rank files row by row (tens of thousands of segments a tensor, each file's rows adjacent).
    for run in runs:  # a local file: posix_fadvise; an object: a background GET
        files.get(run.path).advise(run.offset, run.nbytes)
    return nbytes


def _advised(files: OpenFiles, jobs: Iterator[Any]) -> Iterator[Any]:
    """``jobs``, each advised to the kernel about :data:`READ_AHEAD_BYTES` before it is run.

    Why: the kernel's own read-ahead follows one sequential reader per file, but a ZeRO-3 tensor is
    spread over every rank file (one partition each) and a cast reads 4 MiB at a time, so on a cold cache
    the disk idled while the workers cast. WILLNEED reads in the background, into the page cache (not our
    RSS), only the byte ranges we are about to read (never the Adam moments beside them). For an
    object-store source the same hints start ranged GETs (adjacent ones merged, several in flight), so
    a 4 MiB read finds its bytes fetched; those are held in our memory until read (at most this window).
    """
    ahead = READ_AHEAD_BYTES
    if ahead <= 0:
        yield from jobs
        return
    window: deque[tuple[Any, int]] = deque()
    queued = 0
    for job in jobs:
        n = _advise(files, job)
        window.append((job, n))
        queued += n
        while queued > ahead:
            first, size = window.popleft()
            queued -= size
            yield first
    for job, _ in window:
        yield job


def _run_jobs(files: OpenFiles, out_fd: Out, jobs: Iterator[Any], progress: ProgressFn | None) -> None:
    from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="vllmc-write") as pool:
        pending: set = set()

        def drain(return_when: str) -> None:
            finished, rest = wait(pending, return_when=return_when)
            pending.clear()
            pending.update(rest)
            for fut in finished:
                n = fut.result()  # re-raises a worker's error here
                if progress:
                    progress(n)

        try:
            for job in _advised(files, jobs):
                pending.add(pool.submit(_run_job, files, out_fd, job))
                # Keep a few jobs in flight, not all of them: bounded buffers, prompt errors. Waiting for
                # any job rather than the oldest keeps both workers busy (chunks write disjoint ranges).
                if len(pending) >= 2 * WORKERS:
                    drain(FIRST_COMPLETED)
            drain(ALL_COMPLETED)
        except BaseException:
            if not isinstance(out_fd, int):  # a sink's writer waiting for the failed chunk's gap must not wait on
                out_fd.fail()
            raise


def safetensors_header(pfile: PlannedFile) -> bytes:
    """The header of a planned safetensors file (its data section follows: ``pfile.data_size`` bytes)."""
    return header_bytes([HeaderEntry(t.name, t.out_dtype, t.spec.shape, t.offset, t.offset + t.nbytes)
                         for t in pfile.tensors])


def stream_safetensors_file(pfile: PlannedFile, header: bytes, sink: Any, progress: ProgressFn | None = None) -> None:
    """Write one planned safetensors file into ``sink`` (an object being uploaded) with the same jobs."""
    files = OpenFiles()
    try:
        pwrite_all(sink, memoryview(header), 0)
        _run_jobs(files, sink, _jobs(pfile, len(header)), progress)
    finally:
        files.close()


def write_safetensors_file(pfile: PlannedFile, path: Path, progress: ProgressFn | None = None) -> None:
    """Write one planned safetensors file, streaming each tensor into its slot."""
    header = safetensors_header(pfile)
    files = OpenFiles()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, header)
        os.ftruncate(fd, len(header) + pfile.data_size)
        _run_jobs(files, fd, _jobs(pfile, len(header)), progress)
        os.fsync(fd)
    finally:
        os.close(fd)
        files.close()


# -- PyTorch .bin -------------------------------------------------------------------------------------
