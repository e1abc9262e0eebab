"""Element-wise dtype casts of raw tensor bytes, without importing torch where we can.

Importing torch takes 1.5-3 s and about 200 MiB of RSS, more than the whole bf16 conversion of a
0.5B model. The casts a consolidation needs are between float64, float32, float16 and bfloat16;
numpy (with ``ml_dtypes`` for bfloat16) does those with round-to-nearest-even, element for element
the bits torch's ``Tensor.to`` produces, and it releases the GIL while it works, so the writer's two
threads cast on two cores. Other pairs (float8, integers, bool, complex) go through torch.

Decisions:
    * float64 sources are cast to float32 first, then to the 16-bit target: torch's ``Half`` and
      ``BFloat16`` are built from a ``float``, so torch rounds twice too, and we match it.
    * NaN stays NaN, but its payload and sign are not defined: torch itself writes ``0x7FC0`` from
      its scalar path and ``0xFFFF`` from its AVX2 path for a float32 NaN cast to bfloat16. Every
      other value (finite, infinite, subnormal, signed zero) is bit-identical to torch;
      ``tests/test_casts.py`` checks every float32 bit pattern.
    * numpy and ``ml_dtypes`` are imported on the first cast, not with this module: ``ml_dtypes``
      alone takes about 0.7 s to import, and most commands (``--help``, ``inspect``, an fp32 copy)
      never cast. :data:`NUMPY_DTYPES` is built then too (a PEP 562 module attribute).
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType

#: The dtypes numpy casts between; known without importing numpy.
NUMPY_CASTABLE: frozenset[DType] = frozenset({dtypes.float64, dtypes.float32, dtypes.float16, dtypes.bfloat16})


@functools.cache
def numpy_dtypes() -> dict[DType, Any]:
    """The numpy dtype of each dtype in :data:`NUMPY_CASTABLE` (imports numpy and ``ml_dtypes``, once)."""
    import ml_dtypes
    import numpy as np

    return {
        dtypes.float64: np.dtype(np.float64),
        dtypes.float32: np.dtype(np.float32),
        dtypes.float16: np.dtype(np.float16),
        dtypes.bfloat16: np.dtype(ml_dtypes.bfloat16),
    }


def __getattr__(name: str) -> Any:
    if name == "NUMPY_DTYPES":  # kept for importers that want the numpy dtypes by their old name
        return numpy_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def numpy_castable(src: DType, dst: DType) -> bool:
    """Whether :func:`cast_into` casts ``src`` to ``dst`` with numpy (True) or needs torch (False)."""
    return src in NUMPY_CASTABLE and dst in NUMPY_CASTABLE


def cast_into(src: memoryview, src_dtype: DType, dst_dtype: DType, out: memoryview) -> None:
    """Cast the elements in ``src`` to ``dst_dtype``, writing their bytes into ``out``.

    Args:
        src: Bytes of ``len(src) // src_dtype.itemsize`` elements.
        src_dtype: Their dtype.
        dst_dtype: The target dtype.
        out: Exactly ``count * dst_dtype.itemsize`` writable bytes.
    """
    if numpy_castable(src_dtype, dst_dtype):
        import numpy as np  # already loaded by numpy_dtypes(); a dictionary lookup from the second cast on

        by_dtype = numpy_dtypes()
        values = np.frombuffer(src, dtype=by_dtype[src_dtype])
        target = np.frombuffer(out, dtype=by_dtype[dst_dtype])
        with np.errstate(all="ignore"):  # overflow to inf and NaN are values here, not warnings to print
            if src_dtype == dtypes.float64 and dst_dtype.itemsize == 2:
                values = values.astype(np.float32)  # round twice, as torch does (see the module docstring)
            np.copyto(target, values, casting="unsafe")
        return
    import torch

    torch.frombuffer(out, dtype=dst_dtype.torch).copy_(torch.frombuffer(src, dtype=src_dtype.torch))
