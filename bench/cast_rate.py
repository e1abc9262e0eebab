"""Single-thread fp32 -> bf16 cast rate on the writer's 4 MiB chunks: `casts.cast_into` (the C kernel, then the numpy
fallback), memcpy and `ml_dtypes`; and fp32 -> fp16 (numpy) for comparison.

``cast_into`` rounds on the float32 bits (``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``, NaN apart; see casts.py);
until issue 28 it was numpy's ``astype`` to ``ml_dtypes.bfloat16``, whose import alone took 0.7-4 s. This
prints both rates (the second only when ``ml_dtypes`` is installed) and checks they agree bit for bit on the
sample, plus how long ``import ml_dtypes`` takes in a fresh interpreter.

Usage::

    .venv/bin/python bench/cast_rate.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

from vllm_consolidate import casts, dtypes
from vllm_consolidate.casts import cast_into

CHUNK = 4 * 2**20  # the writer's CAST_CHUNK_BYTES of source


def rate(fn, seconds: float) -> float:
    """Elements per second of ``fn`` (one chunk per call), per second of this thread's CPU time.

    CPU time, not wall: on a shared machine the other jobs take the core away for part of the wall time.
    """
    n, t0 = 0, time.thread_time()
    while time.thread_time() - t0 < seconds:
        fn()
        n += 1
    return n * (CHUNK // 4) / (time.thread_time() - t0)


def import_seconds(module: str) -> float | None:
    """Seconds ``import module`` takes in a fresh interpreter (numpy already imported), None if absent."""
    probe = f"import numpy, time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return float(proc.stdout) if proc.returncode == 0 else None


def main() -> None:
    """Measure and print both rates."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    src = rng.standard_normal(CHUNK // 4, dtype=np.float32)
    ours = bytearray(CHUNK // 2)

    def cast(dst: dtypes.DType = dtypes.bfloat16) -> None:
        cast_into(memoryview(src).cast("B"), dtypes.float32, dst, memoryview(ours))

    kernel = casts.kernel()
    ours_rate = rate(cast, args.seconds)
    fp16_kernel_rate = rate(lambda: cast(dtypes.float16), args.seconds) if kernel is not None else float("nan")
    casts._kernel = None  # the numpy fallback
    numpy_rate = rate(cast, args.seconds)
    fp16_rate = rate(lambda: cast(dtypes.float16), args.seconds)
    casts._kernel = kernel
    copy = np.empty_like(src)
    copy_rate = rate(lambda: np.copyto(copy, src), args.seconds)  # memcpy of the 4 MiB source chunk
    path = "C kernel" if kernel is not None else "numpy: the C kernel is not built"
    line = (f"load {os.getloadavg()[0]:.2f}; per second of one thread's CPU: cast_into ({path}): "
            f"{ours_rate / 1e6:.0f} M elem/s; numpy fallback: {numpy_rate / 1e6:.0f} M elem/s; fp32 -> fp16: "
            f"{fp16_kernel_rate / 1e6:.0f} M elem/s ({path}), {fp16_rate / 1e6:.0f} M elem/s (numpy); "
            f"memcpy of the fp32 chunk: {copy_rate / 1e6:.0f} M elem/s "
            f"({copy_rate * 4 / 1e9:.1f} GB/s); cast / memcpy: {ours_rate / copy_rate:.2f}")
    try:
        import ml_dtypes
    except ImportError:
        print(line + "; ml_dtypes not installed")
        return
    theirs = np.empty(CHUNK // 4, dtype=ml_dtypes.bfloat16)
    theirs_rate = rate(lambda: np.copyto(theirs, src, casting="unsafe"), args.seconds)
    cast()
    same = np.array_equal(np.frombuffer(ours, dtype=np.uint16), theirs.view(np.uint16))
    print(f"{line}; numpy astype to ml_dtypes.bfloat16: {theirs_rate / 1e6:.0f} M elem/s; bit-equal: {same}; "
          f"import ml_dtypes: {import_seconds('ml_dtypes'):.2f} s")


if __name__ == "__main__":
    main()
