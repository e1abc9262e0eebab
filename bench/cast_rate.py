"""Single-thread fp32 -> bf16 cast rate on the writer's 4 MiB chunks: ``casts.cast_into`` against a numpy bit trick.

Evidence for issue 28's bf16 target: without start-up our bf16 conversion of the 0.5B model is 2-4x its
I/O floor with a warm cache, i.e. CPU-bound. This measures how fast one thread casts. The bit trick is
round-to-nearest-even on the uint32 view (``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``), with NaN handled
apart; it is checked here against ``cast_into`` bit for bit on the non-NaN values of the sample.

Usage::

    .venv/bin/python bench/cast_rate.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from vllm_consolidate import dtypes
from vllm_consolidate.casts import cast_into

CHUNK = 4 * 2**20  # the writer's CAST_CHUNK_BYTES of source


def bit_trick(src: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """fp32 (as uint32) -> bf16 bits, round to nearest even; NaN -> 0x7FC0 (quiet NaN)."""
    np.right_shift(src, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, src, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    np.copyto(out, tmp, casting="unsafe")
    nan = (src & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        out[nan] = 0x7FC0


def rate(fn, seconds: float) -> float:
    """Elements per second of ``fn`` (one chunk per call)."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * (CHUNK // 4) / (time.perf_counter() - t0)


def main() -> None:
    """Measure and print both rates."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    src = rng.standard_normal(CHUNK // 4, dtype=np.float32)
    out_a = bytearray(CHUNK // 2)
    out_b = np.empty(CHUNK // 4, dtype=np.uint16)
    tmp = np.empty(CHUNK // 4, dtype=np.uint32)
    u = src.view(np.uint32)
    cast_into(memoryview(src).cast("B"), dtypes.float32, dtypes.bfloat16, memoryview(out_a))
    bit_trick(u, out_b, tmp)
    same = np.array_equal(np.frombuffer(out_a, dtype=np.uint16), out_b)
    a = rate(lambda: cast_into(memoryview(src).cast("B"), dtypes.float32, dtypes.bfloat16, memoryview(out_a)),
             args.seconds)
    b = rate(lambda: bit_trick(u, out_b, tmp), args.seconds)
    print(f"load {os.getloadavg()[0]:.2f}; cast_into (numpy astype to ml_dtypes.bfloat16): {a / 1e6:.0f} M elem/s; "
          f"bit trick: {b / 1e6:.0f} M elem/s; bit-equal on the sample: {same}")


if __name__ == "__main__":
    main()
