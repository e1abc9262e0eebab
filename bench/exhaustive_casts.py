"""Check our torch-free casts against torch on all 2**32 float32 bit patterns (C kernel about 1 minute a dtype).

``tests/test_casts.py`` runs the rounding cases for every exponent and sign in CI; this is the full sweep,
run once by hand:  .venv/bin/python bench/exhaustive_casts.py [--paths 'C kernel' 'C portable' numpy]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_casts import PortableKernel, assert_same_bits, ours  # noqa: E402
from vllm_consolidate import casts, dtypes  # noqa: E402

SPAN = 1 << 24
PATHS = ("C kernel", "C portable", "numpy")

if __name__ == "__main__":
    # Every float32 -> 16-bit path: the C kernel (casts.kernel(); float16 through F16C where the CPU has it), its
    # scalar float16 rounding (what a CPU without F16C runs; bfloat16 is the same loop), and the numpy fallback.
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    args = ap.parse_args()
    kernel = casts.kernel()
    if kernel is None:
        sys.exit("vllm_consolidate._castkernel is not built (pip install -e . with a C compiler)")
    installed = {"C kernel": kernel, "C portable": PortableKernel(kernel), "numpy": None}
    runs = [(dst, path) for path in args.paths for dst in (dtypes.bfloat16, dtypes.float16)
            if not (path == "C portable" and dst == dtypes.bfloat16)]
    for dst, path in runs:
        casts._kernel = installed[path]
        started = time.monotonic()
        for start in range(0, 1 << 32, SPAN):
            values = torch.arange(start, start + SPAN, dtype=torch.int64).to(torch.int32).view(torch.float32)
            assert_same_bits(ours(values, dst), values.to(dst.torch), values)
        print(f"float32 -> {dst.name} ({path}): all 2**32 patterns bit-identical to torch (NaN stays NaN), "
              f"{time.monotonic() - started:.0f} s", flush=True)
