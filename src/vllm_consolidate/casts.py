"""Element-wise dtype casts of raw tensor bytes, without importing torch where we can.

Importing torch takes 1.5-3 s and about 200 MiB of RSS, more than the whole bf16 conversion of a
0.5B model. The casts a consolidation needs are between float64, float32, float16 and bfloat16;
numpy does those with round-to-nearest-even, element for element the bits torch's ``Tensor.to``
produces, and it releases the GIL while it works, so the writer's two threads cast on two cores.
Other pairs (float8, integers, bool, complex) go through torch.

Decisions:
    * bfloat16 is done on the bits, not through ``ml_dtypes``: a bfloat16 is the high half of a
      float32, so widening is a 16-bit shift (exact), and narrowing is round-to-nearest-even on the
      float32 bits, ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``, which is what torch computes. It casts
      as fast as ``ml_dtypes`` (bench/cast_rate.py), and ``import ml_dtypes`` took 0.7-4 s on this
      machine: more than the whole bf16 conversion of a small model.
    * float64 sources are cast to float32 first, then to the 16-bit target: torch's ``Half`` and
      ``BFloat16`` are built from a ``float``, so torch rounds twice too, and we match it.
    * NaN stays NaN, but its payload and sign are not defined: torch itself writes ``0x7FC0`` from
      its scalar path and ``0xFFFF`` from its AVX2 path for a float32 NaN cast to bfloat16 (we keep
      the sign and the top of the payload, quieted). Every other value (finite, infinite, subnormal,
      signed zero) is bit-identical to torch; ``tests/test_casts.py`` checks every float32 bit pattern.
      A chunk is searched for NaN only when its maximum is NaN (one read, no temporary).
    * float32 -> bfloat16, the cast nearly every conversion does, and float32 -> float16 run in a small C
      extension (``_castkernel.c``) when the package was built with it: the same rounding in one pass over
      memory, without the GIL, 3x (bf16) and 30x (fp16, the F16C instruction) the rate of numpy on this
      project's 2-core machine (``bench/cast_rate.py``), and such a conversion never imports numpy (0.1 s).
      The extension is optional (no C compiler: not built); then numpy does it. Both are checked against
      torch (``tests/test_casts.py``).
    * numpy is imported on the first cast that needs it, not with this module: most commands (``--help``,
      ``inspect``, an fp32 copy) never cast.
"""

from __future__ import annotations

from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType

#: The dtypes numpy casts between; known without importing numpy.
NUMPY_CASTABLE: frozenset[DType] = frozenset({dtypes.float64, dtypes.float32, dtypes.float16, dtypes.bfloat16})
#: numpy's names of the dtypes it has itself (bfloat16 is handled as uint16 bits).
_NUMPY_NAMES = {dtypes.float64: "float64", dtypes.float32: "float32", dtypes.float16: "float16"}
#: Per dtype size: the bits above which an element with the sign cleared is NaN (exponent all ones, payload
#: not zero), as an unsigned integer of that size.
NAN_ABOVE: dict[DType, int] = {dtypes.float64: 0x7FF0_0000_0000_0000, dtypes.float32: 0x7F80_0000,
                               dtypes.float16: 0x7C00, dtypes.bfloat16: 0x7F80}


_UNSET: Any = object()
_kernel: Any = _UNSET


def kernel() -> Any:
    """The C cast kernel (``vllm_consolidate._castkernel``), or None where the package was built without it."""
    global _kernel
    if _kernel is _UNSET:
        try:
            from vllm_consolidate import _castkernel
        except ImportError:  # built without a C compiler: numpy does the cast
            _kernel = None
        else:
            _kernel = _castkernel
    return _kernel


def numpy_castable(src: DType, dst: DType) -> bool:
    """Whether :func:`cast_into` casts ``src`` to ``dst`` with numpy (True) or needs torch (False)."""
    return src in NUMPY_CASTABLE and dst in NUMPY_CASTABLE


def nan_mask(bits: Any, dtype: DType) -> Any:
    """Which elements of ``bits`` (a numpy array of unsigned integers of ``dtype``'s size) are NaN."""
    magnitude = bits & bits.dtype.type((1 << (8 * dtype.itemsize - 1)) - 1)
    return magnitude > bits.dtype.type(NAN_ABOVE[dtype])


def _float32_to_bfloat16(values: Any, out: Any) -> None:
    """Round float32 ``values`` to bfloat16 bits in ``out`` (uint16), to nearest even, as torch does."""
    import numpy as np

    u = values.view(np.uint32)
    tmp = np.right_shift(u, 16)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)  # no overflow: the largest non-NaN pattern is 0xFF800000 (-inf)
    np.add(tmp, u, out=tmp)
    # Shifted straight into the uint16 output (one contiguous pass; a strided copy of the high halves was
    # slower, bench/cast_rate.py).
    np.right_shift(tmp, 16, out=out, casting="unsafe")
    # NaN needs its own bits (the rounding above may carry its payload into the sign). ``maximum`` propagates
    # NaN and is a vectorised reduction, about 3x faster than the float32 sum this used before (a third of the
    # whole cast's time); inf and overflow need no fix.
    if values.size and np.isnan(np.maximum.reduce(values)):
        nan = nan_mask(u, dtypes.float32)
        if nan.any():
            out[nan] = (u[nan] >> 16).astype(np.uint16) | 0x0040  # quiet NaN, sign and payload top kept


def _widen_bfloat16(bits: Any, out32: Any) -> None:
    """bfloat16 bits (uint16) to float32 bits (uint32): the high half, exactly."""
    import numpy as np

    np.copyto(out32, bits, casting="safe")
    np.left_shift(out32, 16, out=out32)


def cast_into(src: memoryview, src_dtype: DType, dst_dtype: DType, out: memoryview) -> None:
    """Cast the elements in ``src`` to ``dst_dtype``, writing their bytes into ``out``.

    Args:
        src: Bytes of ``len(src) // src_dtype.itemsize`` elements.
        src_dtype: Their dtype.
        dst_dtype: The target dtype.
        out: Exactly ``count * dst_dtype.itemsize`` writable bytes.
    """
    if src_dtype == dtypes.float32 and dst_dtype in (dtypes.bfloat16, dtypes.float16) and (k := kernel()) is not None:
        (k.float32_to_bfloat16 if dst_dtype == dtypes.bfloat16 else k.float32_to_float16)(src, out)
        return
    if not numpy_castable(src_dtype, dst_dtype):
        import torch

        torch.frombuffer(out, dtype=dst_dtype.torch).copy_(torch.frombuffer(src, dtype=src_dtype.torch))
        return
    import numpy as np

    with np.errstate(all="ignore"):  # overflow to inf and NaN are values here, not warnings to print
        if src_dtype == dtypes.bfloat16:
            bits = np.frombuffer(src, dtype=np.uint16)
            if dst_dtype == dtypes.bfloat16:
                np.frombuffer(out, dtype=np.uint16)[:] = bits
            elif dst_dtype == dtypes.float32:
                _widen_bfloat16(bits, np.frombuffer(out, dtype=np.uint32))
            else:  # widened exactly, then rounded once, as torch does through float
                wide = np.empty(bits.size, dtype=np.uint32)
                _widen_bfloat16(bits, wide)
                np.copyto(np.frombuffer(out, dtype=_NUMPY_NAMES[dst_dtype]), wide.view(np.float32), casting="unsafe")
            return
        values = np.frombuffer(src, dtype=_NUMPY_NAMES[src_dtype])
        if dst_dtype != dtypes.bfloat16:
            if src_dtype == dtypes.float64 and dst_dtype.itemsize == 2:
                values = values.astype(np.float32)  # round twice, as torch does (see the module docstring)
            np.copyto(np.frombuffer(out, dtype=_NUMPY_NAMES[dst_dtype]), values, casting="unsafe")
            return
        if src_dtype != dtypes.float32:  # float16 widens exactly; float64 rounds once here, as torch does
            values = values.astype(np.float32)
        _float32_to_bfloat16(values, np.frombuffer(out, dtype=np.uint16))
