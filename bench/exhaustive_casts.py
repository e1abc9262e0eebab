"""Check our torch-free casts against torch on all 2**32 float32 bit patterns (about 8 minutes on 2 cores).

``tests/test_casts.py`` runs the rounding cases for every exponent and sign in CI; this is the full sweep,
run once by hand:  .venv/bin/python bench/exhaustive_casts.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_casts import assert_same_bits, ours  # noqa: E402
from vllm_consolidate import casts, dtypes  # noqa: E402

SPAN = 1 << 24

if __name__ == "__main__":
    # float32 -> bfloat16 twice: the C kernel (casts.kernel()), then the numpy fallback.
    runs = [(dtypes.bfloat16, "C kernel"), (dtypes.bfloat16, "numpy"), (dtypes.float16, "numpy")]
    kernel = casts.kernel()
    if kernel is None:
        sys.exit("vllm_consolidate._castkernel is not built (pip install -e . with a C compiler)")
    for dst, path in runs:
        casts._kernel = kernel if path == "C kernel" else None
        started = time.monotonic()
        for start in range(0, 1 << 32, SPAN):
            values = torch.arange(start, start + SPAN, dtype=torch.int64).to(torch.int32).view(torch.float32)
            assert_same_bits(ours(values, dst), values.to(dst.torch), values)
        print(f"float32 -> {dst.name} ({path}): all 2**32 patterns bit-identical to torch (NaN stays NaN), "
              f"{time.monotonic() - started:.0f} s")
