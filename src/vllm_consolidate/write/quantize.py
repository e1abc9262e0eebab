"""``--quantize``: quantize a weight block of rows at a time as it streams, writing the values and their scales.

A job reads rows ``[first, first + n)`` of one weight (merging a LoRA update when there is one), casts them to the
working dtype (``--dtype``, bf16 by default) and quantizes them: the writer's threads run these jobs like its
other chunks, so a weight is read once and peak memory stays at a few blocks of rows. Per-row scales need whole
rows and 128x128 block scales need 128 rows, so a job covers whole rows (a multiple of 128 for blocks).

The arithmetic is compressed-tensors 0.19's (``calculate_qparams`` + ``NaiveQuantizationCompressor.compress``) as
torch computes it, redone with numpy so that ``convert --quantize`` never imports torch (about 220 MiB of RSS,
more than the rest of the pass). torch computes a bfloat16 or float16 operation in float32 and rounds the result
to the tensor's dtype (nearest even), so each step below is a float32 numpy operation followed by that rounding
(:func:`vllm_consolidate.casts.cast_into`, bit for bit torch's cast):

* ``absmax = max(|min(w, 0)|, |max(w, 0)|)`` over a row or block (exact; NaN propagates, as in torch);
* ``scale = absmax / ((qmax - qmin) / 2)``, rounded to the working dtype: 448 for FP8 E4M3, 127.5 (not 127) for
  INT8; a zero scale becomes the dtype's machine epsilon;
* ``q = clamp(w / scale + 0, qmin, qmax)`` (the division rounded to the working dtype, NaN kept; adding the
  symmetric zero point turns -0 into +0), then FP8 E4M3 by
  torch's own bit recipe (:func:`float8_e4m3fn_bits`: round to nearest even, subnormals, overflow saturating to
  448, NaN to ``0x7f`` with its sign) or ``round`` half to even and ``int8`` (NaN becomes 0, as torch's cast).
  With a 16-bit working dtype everything after the division depends only on the rounded quotient's 16 bits, so
  it is one lookup in a 65536-entry table of that same computation (FP8 3x faster than computing it).

Decision: a NaN code's sign bit is not reproduced. torch itself writes ``0x7f`` or ``0xff`` (and a bf16 NaN scale
as ``0x7fc0`` or ``0xffff``) for the same NaN depending on whether the element went through its SIMD loop or the
scalar tail; ours keeps the sign numpy's arithmetic gives. Every other byte is torch's.

``tests/test_quantize_kernels.py`` checks these against torch on every bfloat16 value and against llm-compressor
on edge weights; ``tests/test_quantize.py`` byte for byte on the corpus.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.casts import cast_into
from vllm_consolidate.dtypes import DType
from vllm_consolidate.plan.lora_rows import merged_rows
from vllm_consolidate.plan.quantize import Scheme
from vllm_consolidate.plan.shards import PlannedTensor
from vllm_consolidate.read.gather import read_gathered
from vllm_consolidate.read.ranges import OpenFiles, thread_buffer
from vllm_consolidate.source import sub_segments
from vllm_consolidate.write.pwrite import Out, pwrite_all

#: Source bytes (as float32) per job, about: a few of these are in flight at once.
JOB_BYTES = 4 * 2**20
#: The smallest float32 bit pattern (magnitude) that is not below E4M3's range: 480.0 (448 rounds up to it).
_FP8_OVER = 1087 << 20
#: Below 2**-6 (E4M3's smallest normal) the value is rounded by adding 2**14 in float32 (torch's denorm_mask).
_FP8_NORMAL = 121 << 23
_FP8_DENORM = 141 << 23
#: Machine epsilon of each working dtype (torch.finfo(dtype).eps).
_EPS = {dtypes.bfloat16: 2.0**-7, dtypes.float16: 2.0**-10, dtypes.float32: 2.0**-23, dtypes.float64: 2.0**-52}


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


def _wide(work: DType) -> Any:
    """The numpy dtype a working dtype's arithmetic is done in (torch's ``opmath``): float64 or float32."""
    import numpy as np

    return np.float64 if work == dtypes.float64 else np.float32


def to_work(values: Any, work: DType) -> Any:
    """``values`` (float32 or float64) rounded to ``work`` as torch's ``Tensor.to`` does, widened back."""
    import numpy as np

    values = np.ascontiguousarray(values, dtype=_wide(work))
    if work in (dtypes.float32, dtypes.float64):
        return values
    narrow = bytearray(values.size * work.itemsize)
    cast_into(memoryview(values).cast("B"), dtypes.float32, work, memoryview(narrow))
    return from_bytes(memoryview(narrow), work).reshape(values.shape)


def from_bytes(data: Any, dtype: DType) -> Any:
    """The elements of ``data`` (bytes of ``dtype``, a float type) widened exactly to float32 (float64 stays)."""
    import numpy as np

    if dtype == dtypes.float64:
        return np.frombuffer(data, dtype=np.float64)
    if dtype == dtypes.float32:
        return np.frombuffer(data, dtype=np.float32)
    out = np.empty(len(data) // dtype.itemsize, dtype=np.float32)
    cast_into(data, dtype, dtypes.float32, memoryview(out).cast("B"))
    return out


def float8_e4m3fn_bits(x: Any) -> Any:
    """float32 ``x`` to float8_e4m3fn bits (uint8), exactly as torch 2.13's ``fp8e4m3fn_from_fp32_value``."""
    import numpy as np

    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    sign = (u >> 24) & 0x80
    mag = u & np.uint32(0x7FFFFFFF)
    with np.errstate(all="ignore"):  # the unused branch of each np.where may over/underflow
        denorm = (mag.view(np.float32) + np.uint32(_FP8_DENORM).view(np.float32)).view(np.uint32) - _FP8_DENORM
        normal = (mag + np.uint32((-120 << 23) & 0xFFFFFFFF) + 0x7FFFF + ((mag >> 20) & 1)) >> 20
    normal = np.minimum(normal & 0xFF, 0x7E)  # a carry into 0x7f (NaN) saturates
    bits = np.where(mag < _FP8_NORMAL, denorm, normal)
    bits = np.where(mag >= _FP8_OVER, np.where(mag > 0x7F800000, 0x7F, 0x7E), bits)
    return (bits | sign).astype(np.uint8)


def quantize_rows(w: Any, scheme: Scheme, work: DType) -> tuple[Any, Any]:
    """``(q, scale)`` of a 2-D block of whole rows ``w`` (a multiple of the block height, or the last rows).

    ``w`` holds values of the working dtype ``work`` (in float32, float64 for a float64 ``work``). ``q`` is
    ``int8`` or ``uint8`` float8 bits; ``scale`` holds values of ``work`` shaped like the stored scale rows.
    """
    import numpy as np

    rows, cols = w.shape
    with np.errstate(all="ignore"):  # NaN and inf are values here (torch computes with them silently)
        if scheme.block is None:
            lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
        else:
            b = scheme.block
            pad_r, pad_c = -rows % b, -cols % b  # zeros change no absmax (0 is in every range anyway)
            padded = np.pad(w, ((0, pad_r), (0, pad_c))) if pad_r or pad_c else w
            blocks = padded.reshape((rows + pad_r) // b, b, (cols + pad_c) // b, b)
            lo, hi = blocks.min(axis=(1, 3)), blocks.max(axis=(1, 3))
        absmax = np.maximum(np.abs(np.minimum(lo, 0)), np.abs(np.maximum(hi, 0)))
        scale = to_work(absmax / ((scheme.qmax - scheme.qmin) / 2), work)
        scale[scale == 0] = _EPS[work]
        per_elem = scale if scheme.block is None else np.repeat(np.repeat(scale, b, 0), b, 1)[:rows, :cols]
        quotient = w / per_elem
        if work in _CODE_TABLE_DTYPES:  # the rest is a function of the rounded 16-bit quotient: one table lookup
            return _code_table(scheme, work)[_bits16(quotient, work)], scale
        return _codes(to_work(quotient, work), scheme), scale


def _codes(scaled: Any, scheme: Scheme) -> Any:
    """The stored codes of quotients already rounded to the working dtype: + 0, clamp, round, cast."""
    import numpy as np

    with np.errstate(all="ignore"):
        # + 0: compressed-tensors adds the (zero) zero point, which turns -0 into +0 (FP8 0x00, not 0x80)
        scaled = np.clip(scaled + 0, scheme.qmin, scheme.qmax)
        if scheme.kind == "float":
            return float8_e4m3fn_bits(scaled)
        q = np.rint(scaled)
        q[np.isnan(q)] = 0
        return q.astype(np.int8)


#: Working dtypes whose every value fits a 65536-entry table.
_CODE_TABLE_DTYPES = (dtypes.bfloat16, dtypes.float16)


@functools.cache
def _code_table(scheme: Scheme, work: DType) -> Any:
    """:func:`_codes` of every 16-bit pattern of ``work``, indexed by the pattern (3x faster than computing them)."""
    import numpy as np

    every = np.arange(2**16, dtype=np.uint16)
    return _codes(from_bytes(memoryview(every).cast("B"), work), scheme)


def _bits16(values: Any, work: DType) -> Any:
    """float32 ``values`` rounded to ``work`` (bfloat16 or float16) as torch does, as uint16 bit patterns."""
    import numpy as np

    out = np.empty(values.size, dtype=np.uint16)
    cast_into(memoryview(np.ascontiguousarray(values, dtype=np.float32)).cast("B"), dtypes.float32, work,
              memoryview(out).cast("B"))
    return out.reshape(values.shape)


def _rows(files: OpenFiles, job: QuantJob) -> Any:
    """The job's rows as values of the working dtype (float32 numpy, float64 for float64)."""
    spec = job.tensor.spec
    work = job.tensor.quant.work_dtype
    cols = spec.shape[1]
    nbytes = job.rows * cols * spec.dtype.itemsize
    buf = thread_buffer(nbytes)
    # Gathered: a TP row-parallel weight's rows alternate rank files (one read per run, not per range).
    read_gathered(files, buf, list(sub_segments(spec.segments, job.first * cols * spec.dtype.itemsize, nbytes)))
    if spec.delta is not None:  # a LoRA merge: float32 rows, cast like any float32 source
        data, dtype = memoryview(merged_rows(spec, job.first, job.rows, buf)).cast("B"), dtypes.float32
    else:
        data, dtype = memoryview(buf)[:nbytes], spec.dtype
    if dtype != work:  # torch's Tensor.to(work): the one rounding (float64 through float32, as torch)
        cast = bytearray(job.rows * cols * work.itemsize)
        cast_into(data, dtype, work, memoryview(cast))
        data = memoryview(cast)
    return from_bytes(data, work).reshape(job.rows, cols)


def run_quant_job(files: OpenFiles, out_fd: Out, job: QuantJob) -> int:
    """Quantize and write one job's rows and their scales; returns the bytes written."""
    t = job.tensor
    scheme = t.quant.scheme
    work = t.quant.work_dtype
    q, scale = quantize_rows(_rows(files, job), scheme, work)
    cols = t.spec.shape[1]
    s_bytes = bytearray(scale.size * work.itemsize)
    cast_into(memoryview(scale.astype(_wide(work))).cast("B"), dtypes.float64 if work == dtypes.float64
              else dtypes.float32, work, memoryview(s_bytes))
    first_scale_row = job.first // scheme.rows_per_group()
    written = pwrite_all(out_fd, memoryview(q).cast("B"), job.base + t.offset + job.first * cols * t.out_dtype.itemsize)
    written += pwrite_all(out_fd, memoryview(s_bytes), job.base + t.scale.offset + first_scale_row * scale.shape[1]
                           * t.scale.out_dtype.itemsize)
    return written
