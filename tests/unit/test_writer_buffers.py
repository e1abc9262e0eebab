"""The RAM estimate counts every buffer the writer's threads hold (``write.estimates``), measured on the real writer.

Each per-thread buffer the writer asks for (``read.ranges.thread_buffer``: a chunk's source bytes, its cast, the
scratch copy of a gathered read, a plain copy the kernel refused) is recorded while it writes a plan of every kind
of tensor: a plain copy, a cast, a tensor stored as many small ranges alternating two files (a TP row-parallel
weight) and one that is also cast. The writer's chunk constants are shrunk so that small tensors fill whole chunks;
the estimate, derived from the same constants, must follow them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.plan.shards import plan_output
from vllm_consolidate.read import gather
from vllm_consolidate.source import Segment, TensorSpec
from vllm_consolidate.write import safetensors as writer
from vllm_consolidate.write import write_plan
from vllm_consolidate.write.estimates import JOB_BASE_RSS, PER_TENSOR_RSS, estimate_peak_ram

KIB = 2**10


def _spec(folder: Path, name: str, dtype, shape: tuple[int, int], range_bytes: int | None = None) -> TensorSpec:
    """A tensor of random bytes: one range in one file, or ranges of ``range_bytes`` alternating two files."""
    nbytes = shape[0] * shape[1] * dtype.itemsize
    data = os.urandom(nbytes)
    if range_bytes is None:
        (folder / f"{name}.bin").write_bytes(data)
        return TensorSpec(name, dtype, shape, [Segment(str(folder / f"{name}.bin"), 0, nbytes)])
    files = [folder / f"{name}.{r}.bin" for r in (0, 1)]
    parts: list[bytes] = [b"", b""]
    segments = []
    for i, start in enumerate(range(0, nbytes, range_bytes)):
        segments.append(Segment(str(files[i % 2]), len(parts[i % 2]), range_bytes))
        parts[i % 2] += data[start:start + range_bytes]
    for f, part in zip(files, parts):
        f.write_bytes(part)
    return TensorSpec(name, dtype, shape, segments)


def test_the_estimate_counts_every_buffer_the_writer_threads_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "CHUNK_BYTES", 128 * KIB)
    monkeypatch.setattr(writer, "CAST_CHUNK_BYTES", 16 * KIB)
    monkeypatch.setattr(writer, "GATHER_CHUNK_BYTES", 8 * KIB)
    asked: dict[tuple[int, str], int] = {}
    real = writer.thread_buffer

    def spy(nbytes: int, slot: str = "src") -> memoryview:
        key = (threading.get_ident(), slot)
        asked[key] = max(asked.get(key, 0), nbytes)
        return real(nbytes, slot)

    def refuse(*args: object) -> int:  # as a file system without copy_file_range, or an object-store input
        raise OSError("copy_file_range refused")

    monkeypatch.setattr(writer, "thread_buffer", spy)
    monkeypatch.setattr(gather, "thread_buffer", spy)
    monkeypatch.setattr(writer.os, "copy_file_range", refuse)
    specs = [_spec(tmp_path, "copy", dtypes.float32, (384, 128)),  # 192 KiB: a 128 KiB chunk, then 64 KiB
             _spec(tmp_path, "cast", dtypes.float32, (64, 256)),
             _spec(tmp_path, "tp", dtypes.float32, (64, 512), range_bytes=KIB),
             _spec(tmp_path, "tp_cast", dtypes.float16, (32, 512), range_bytes=KIB)]
    plan = plan_output(specs, target_dtype=None, max_shard_size=2**40,
                       out_dtypes={"cast": dtypes.bfloat16, "tp_cast": dtypes.bfloat16})
    (tmp_path / "out").mkdir()
    write_plan(plan, tmp_path / "out")

    held: dict[str, int] = {}  # per buffer kind, the largest any thread held (any thread may run any job)
    for (_, slot), nbytes in asked.items():
        held[slot] = max(held.get(slot, 0), nbytes)
    # copy: the 128 KiB chunk the kernel refused; src: the last 64 KiB (one range of at most SMALL_RANGE_BYTES is
    # read, not copied by the kernel); dst: the f16 -> bf16 cast's 16 KiB chunk; gather: its 16 small ranges.
    assert held == {"copy": 128 * KIB, "src": 64 * KIB, "dst": 16 * KIB, "gather": 16 * KIB}, held
    assert estimate_peak_ram(plan) == JOB_BASE_RSS + PER_TENSOR_RSS * 4 + writer.WORKERS * sum(held.values())
    assert {k: v for k, v in _largest(plan.tensors).items() if v} == held  # each kind, not only the sum


def _largest(tensors) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        for kind, nbytes in writer.job_buffers(t).items():
            out[kind] = max(out.get(kind, 0), nbytes)
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_the_estimate_of_a_plan_without_casts(tmp_path, fmt):
    """safetensors: a plain copy is counted at its chunk (the kernel may refuse to copy it) and a range of at most
    SMALL_RANGE_BYTES, which is read; ``.bin`` builds the largest tensor whole, plus a copy chunk."""
    specs = [_spec(tmp_path, "a", dtypes.float32, (16, 16)), _spec(tmp_path, "b", dtypes.float32, (1024, 1024))]
    plan = plan_output(specs, target_dtype=None, max_shard_size=2**40, fmt=fmt)
    buffers = (writer.WORKERS * (4 * 2**20 + gather.SMALL_RANGE_BYTES) if fmt == "safetensors"
               else 4 * 2**20 + writer.CHUNK_BYTES)
    assert estimate_peak_ram(plan) == JOB_BASE_RSS + PER_TENSOR_RSS * 2 + buffers


def test_quantized_weights_are_counted_by_quantize_rss(tmp_path):
    """--quantize: a quantized weight's row blocks are in QUANTIZE_RSS; the other tensors' buffers as above."""
    from vllm_consolidate.write.estimates import QUANTIZE_RSS, writer_buffers

    specs = [_spec(tmp_path, "a", dtypes.float32, (64, 64)), _spec(tmp_path, "b", dtypes.float32, (1024, 1024))]
    plan = plan_output(specs, target_dtype=dtypes.bfloat16, max_shard_size=2**40)
    plan.files[0].tensors[1].quant = object()
    assert writer_buffers(plan.tensors[:1]) == writer.WORKERS * (16 * 2**10 + 8 * 2**10)  # a, cast whole
    assert estimate_peak_ram(plan) == JOB_BASE_RSS + PER_TENSOR_RSS * 2 + writer_buffers(plan.tensors[:1]) + (
        QUANTIZE_RSS)
