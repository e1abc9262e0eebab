"""``--quantize``: quantize a weight block of rows at a time as it streams, writing the values and their scales.

A job reads rows ``[first, first + n)`` of one weight (merging a LoRA update when there is one), casts them to the
working dtype (``--dtype``, bf16 by default) and quantizes them: the writer's threads run these jobs like its
other chunks, so a weight is read once and peak memory stays at a few blocks of rows. Per-row scales need whole
rows and 128x128 block scales need 128 rows, so a job covers whole rows (a multiple of 128 for blocks).

The arithmetic is compressed-tensors 0.19's (``calculate_qparams`` + ``NaiveQuantizationCompressor.compress``),
done with the same torch operations in the same dtypes, so the bytes are the same:

* ``absmax = max(|min(w, 0)|, |max(w, 0)|)`` over a row or block, in the working dtype;
* ``scale = absmax / ((qmax - qmin) / 2)`` in the working dtype: 448 for FP8 E4M3, 127.5 (not 127) for INT8;
  a zero scale becomes the dtype's machine epsilon;
* ``q = clamp(w / scale, qmin, qmax)`` (a division, in the working dtype: rounded once there, then again by the
  cast), then ``.to(float8_e4m3fn)`` (round to nearest even) or ``torch.round`` (half to even) and ``.to(int8)``.

torch is imported here only when a weight is quantized.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vllm_consolidate.plan.lora_rows import merged_rows
from vllm_consolidate.plan.quantize import Scheme
from vllm_consolidate.plan.shards import PlannedTensor
from vllm_consolidate.read.ranges import OpenFiles, read_into, thread_buffer
from vllm_consolidate.source import sub_segments
from vllm_consolidate.write.pwrite import Out, pwrite_all

#: Source bytes (as float32) per job, about: a few of these are in flight at once.
JOB_BYTES = 4 * 2**20


@dataclass
class QuantJob:
    """Rows ``[first, first + rows)`` of a quantized weight; ``base`` is the file's data-section offset."""

    tensor: PlannedTensor
    first: int
    rows: int
    base: int


def quant_jobs(t: PlannedTensor, base: int) -> Iterator[QuantJob]:
    """The jobs that write weight ``t`` and its scale."""
    rows, cols = t.spec.shape
    group = t.quant.scheme.rows_per_group()
    step = max(1, JOB_BYTES // (4 * cols * group)) * group
    for first in range(0, rows, step):
        yield QuantJob(t, first, min(step, rows - first), base)


def quantize_rows(w: Any, scheme: Scheme) -> tuple[Any, Any]:
    """``(q, scale)`` of a 2-D block of whole rows ``w`` (a multiple of the block height, or the last rows).

    ``w`` is in the working dtype; ``scale`` comes out in it too, shaped like the stored ``weight_scale`` rows.
    """
    import torch

    qmin = torch.tensor(scheme.qmin)
    qmax = torch.tensor(scheme.qmax)
    rows, cols = w.shape
    if scheme.block is None:
        lo, hi = torch.amin(w, dim=-1, keepdim=True), torch.amax(w, dim=-1, keepdim=True)
    else:
        b = scheme.block
        pad_r, pad_c = -rows % b, -cols % b  # zeros change no absmax (0 is in every range anyway)
        padded = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r)) if pad_r or pad_c else w
        blocks = padded.reshape((rows + pad_r) // b, b, (cols + pad_c) // b, b)
        lo, hi = torch.amin(blocks, dim=(1, 3)), torch.amax(blocks, dim=(1, 3))
    lo = torch.min(lo, torch.zeros_like(lo))
    hi = torch.max(hi, torch.zeros_like(hi))
    absmax = torch.max(torch.abs(lo), torch.abs(hi))
    scale = absmax / ((qmax - qmin).to(absmax.dtype) / 2)
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype), scale)
    if scheme.block is None:
        per_elem = scale
    else:
        per_elem = scale.repeat_interleave(scheme.block, 0).repeat_interleave(scheme.block, 1)[:rows, :cols]
    scaled = torch.clamp(w / per_elem, qmin, qmax)
    q = scaled.to(torch.float8_e4m3fn) if scheme.kind == "float" else torch.round(scaled).to(torch.int8)
    return q, scale


def _rows(files: OpenFiles, job: QuantJob) -> Any:
    """The job's rows as a torch tensor in the working dtype."""
    import torch

    spec = job.tensor.spec
    cols = spec.shape[1]
    nbytes = job.rows * cols * spec.dtype.itemsize
    buf = thread_buffer(nbytes)
    read_into(files, buf, sub_segments(spec.segments, job.first * cols * spec.dtype.itemsize, nbytes))
    if spec.delta is not None:  # a LoRA merge: float32 rows, cast like any float32 source
        data, dtype = merged_rows(spec, job.first, job.rows, buf), torch.float32
    else:
        data, dtype = buf, spec.dtype.torch
    w = torch.frombuffer(data, dtype=dtype).view(job.rows, cols)
    return w.to(job.tensor.quant.work_dtype.torch)


def run_quant_job(files: OpenFiles, out_fd: Out, job: QuantJob) -> int:
    """Quantize and write one job's rows and their scales; returns the bytes written."""
    import torch


    t = job.tensor
    scheme = t.quant.scheme
    q, scale = quantize_rows(_rows(files, job), scheme)
    cols = t.spec.shape[1]
    q_bytes = memoryview(q.contiguous().view(-1).view(dtype=torch.uint8).numpy())
    s_bytes = memoryview(scale.contiguous().view(-1).view(dtype=torch.uint8).numpy())
    first_scale_row = job.first // scheme.rows_per_group()
    written = pwrite_all(out_fd, q_bytes, job.base + t.offset + job.first * cols * t.out_dtype.itemsize)
    written += pwrite_all(out_fd, s_bytes, job.base + t.scale.offset + first_scale_row * scale.shape[1]
                           * t.scale.out_dtype.itemsize)
    return written


