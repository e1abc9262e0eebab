"""The writer's read-ahead: every source range it reads was handed to the kernel (``WILLNEED``) first, and
the bytes written do not depend on it.

Why it exists (write/safetensors.py ``_advised``): on a cold cache the disk idled while the workers cast.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.plan.shards import plan_output
from vllm_consolidate.read import gather
from vllm_consolidate.source import Segment, TensorSpec
from vllm_consolidate.write import safetensors as writer
from vllm_consolidate.write import write_plan

ROWS, COLS = 96, 1024  # 384 KiB of float32 per tensor


def _source(tmp_path: Path) -> list[TensorSpec]:
    """Three float32 tensors, each split over two files (as a ZeRO-3 parameter is over its ranks)."""
    files = [tmp_path / "rank0.bin", tmp_path / "rank1.bin"]
    blobs = [bytearray(b"\xab" * 4096), bytearray(b"\xcd" * 8192)]  # headers we never read
    specs = []
    for i in range(3):
        values = [(i * 1000 + k) * 0.5 - 7.25 for k in range(ROWS * COLS)]
        raw = struct.pack(f"<{len(values)}f", *values)
        half = len(raw) // 2
        segs = []
        for f, blob, part in ((files[0], blobs[0], raw[:half]), (files[1], blobs[1], raw[half:])):
            segs.append(Segment(str(f), len(blob), len(part)))
            blob += part
        specs.append(TensorSpec(f"t{i}.weight", dtypes.float32, (ROWS, COLS), segs))
    for f, blob in zip(files, blobs):
        f.write_bytes(bytes(blob))
    return specs


@pytest.fixture
def recorded(monkeypatch):
    events: list[tuple[str, str, int, int]] = []
    real_read = gather.read_into

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        events.append(("advise", os.readlink(f"/proc/self/fd/{fd}"), offset, length))

    def read_into(files, buf, segs):
        segs = list(segs)
        for s in segs:
            events.append(("read", s.path, s.offset, s.nbytes))
        return real_read(files, buf, iter(segs))

    monkeypatch.setattr(writer.os, "posix_fadvise", advise)
    monkeypatch.setattr(gather, "read_into", read_into)  # every read the writer makes goes through read_gathered
    monkeypatch.setattr(writer, "CAST_CHUNK_BYTES", 64 * 1024)  # many chunks per tensor
    return events


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux/POSIX only")
@pytest.mark.parametrize("ahead", [0, 256 * 1024, 64 * 2**20])
def test_every_read_was_advised_first_and_the_bytes_do_not_change(tmp_path, recorded, monkeypatch, ahead):
    monkeypatch.setattr(writer, "READ_AHEAD_BYTES", ahead)
    specs = _source(tmp_path)
    plan = plan_output(specs, target_dtype=dtypes.bfloat16, max_shard_size=2**40)
    out = tmp_path / "out"
    out.mkdir()
    write_plan(plan, out)

    reads = [e[1:] for e in recorded if e[0] == "read"]
    advised = [e[1:] for e in recorded if e[0] == "advise"]
    assert len(reads) >= 3 * (ROWS * COLS * 4 // (64 * 1024))  # many chunks per tensor
    if ahead == 0:
        assert advised == []
    else:
        for i, (path, off, n) in enumerate(reads):  # advised before it was read, and covering it
            before = advised[: sum(1 for e in recorded[: recorded.index(("read", path, off, n))] if e[0] == "advise")]
            assert any(p == path and o <= off and off + n <= o + m for p, o, m in before), (i, path, off)
        assert sum(m for _, _, m in advised) == sum(n for _, _, n in reads)  # no byte beyond what is read
    # The bf16 bits do not depend on the read-ahead: compare with a plain computation.
    data = (out / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    first = struct.unpack(f"<{ROWS * COLS}f", struct.pack(f"<{ROWS * COLS}f",
                                                           *[k * 0.5 - 7.25 for k in range(ROWS * COLS)]))
    want = b"".join(struct.pack("<H", struct.unpack("<I", struct.pack("<f", v))[0] >> 16) for v in first[:64])
    assert data[header:header + 128] == want  # these values are exact in bfloat16's top half (no rounding)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux/POSIX only")
@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.bfloat16])
def test_rows_alternating_between_files_are_advised_and_read_once_per_file(tmp_path, recorded, monkeypatch, dtype):
    """A Megatron row-parallel weight under TP=2: each row's halves in two rank files (row r of file k right after
    row r-1). The hints cover exactly the bytes read, in one call per file, not one per row; so do the reads
    (each file's rows read at once and scattered, issue 24's benchmark), as a copy and as a cast."""
    monkeypatch.setattr(writer, "READ_AHEAD_BYTES", 64 * 2**20)
    half = COLS // 2 * 4
    files = [tmp_path / "rank0.bin", tmp_path / "rank1.bin"]
    values = struct.pack(f"<{ROWS * COLS}f", *[k * 0.25 for k in range(ROWS * COLS)])
    rows = [values[r * COLS * 4:(r + 1) * COLS * 4] for r in range(ROWS)]
    for k, f in enumerate(files):
        f.write_bytes(b"".join(row[k * half:(k + 1) * half] for row in rows))
    segs = [Segment(str(files[k]), r * half, half) for r in range(ROWS) for k in range(2)]
    spec = TensorSpec("w.weight", dtypes.float32, (ROWS, COLS), segs)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(writer, "CAST_CHUNK_BYTES", 2**20)  # one job: the reads below are the whole tensor's
    write_plan(plan_output([spec], target_dtype=dtype, max_shard_size=2**40), out)

    advised = [e[1:] for e in recorded if e[0] == "advise"]
    reads = [e[1:] for e in recorded if e[0] == "read"]
    assert advised == [(str(files[0]), 0, ROWS * half), (str(files[1]), 0, ROWS * half)]  # 2 calls, not 2 x ROWS
    assert reads == advised
    data = (out / "model.safetensors").read_bytes()
    got = data[8 + struct.unpack("<Q", data[:8])[0]:]
    if dtype == dtypes.float32:
        assert got == values
    else:  # the cast as torch does it (round to nearest even)
        import numpy as np
        import torch

        want = torch.from_numpy(np.frombuffer(values, dtype=np.float32).copy()).to(torch.bfloat16)
        assert got == want.view(torch.int16).numpy().tobytes()


def test_a_row_parallel_copy_passes_through_memory_in_small_chunks(tmp_path, monkeypatch):
    """A float32 TP row-parallel weight (rows alternating between two rank files) copied without a cast still goes
    through a buffer (read per file run, interleaved, written), so it is cut into ``GATHER_CHUNK_BYTES`` chunks,
    not the kernel copy's 16 MiB: on the 0.5B Megatron benchmark 16 MiB buffers made its pwrites the slowest
    part of the fp32 conversion (issue 24), and four of them were most of its peak RSS. The bytes are the same."""
    rows, cols = 640, 1024  # 2.5 MiB: more than one gather chunk
    half = cols // 2 * 4
    files = [tmp_path / "rank0.bin", tmp_path / "rank1.bin"]
    values = struct.pack(f"<{rows * cols}f", *[k * 0.25 - 3.0 for k in range(rows * cols)])
    for k, f in enumerate(files):
        f.write_bytes(b"".join(values[r * cols * 4 + k * half:r * cols * 4 + (k + 1) * half] for r in range(rows)))
    segs = [Segment(str(files[k]), r * half, half) for r in range(rows) for k in range(2)]
    writes: list[int] = []
    real = writer.pwrite_all

    def pwrite_all(fd, data, offset):
        writes.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(writer, "pwrite_all", pwrite_all)
    out = tmp_path / "out"
    out.mkdir()
    write_plan(plan_output([TensorSpec("w.weight", dtypes.float32, (rows, cols), segs)],
                           target_dtype=dtypes.float32, max_shard_size=2**40), out)
    assert len(writes) > 1 and max(writes) <= writer.GATHER_CHUNK_BYTES < rows * cols * 4
    data = (out / "model.safetensors").read_bytes()
    assert data[8 + struct.unpack("<Q", data[:8])[0]:] == values


def test_jobs_cut_a_tensor_s_ranges_as_sub_segments_does():
    """The writer cuts each tensor's ranges into its chunks in one pass (``_cut``); per chunk they are those
    ``sub_segments`` gives (which scans from the first range: quadratic over a TP weight's thousands)."""
    import random

    from vllm_consolidate.source import sub_segments

    rnd = random.Random(1)
    for _ in range(2000):
        segs = [Segment(rnd.choice("ab"), rnd.randint(0, 50), rnd.randint(1, 9)) for _ in range(rnd.randint(1, 10))]
        total, n = sum(s.nbytes for s in segs), rnd.randint(1, 60)
        want = [list(sub_segments(segs, start, min(n, total - start))) for start in range(0, total, n)]
        assert [list(c) for c in writer._cut(segs, n)] == want, (segs, n)
