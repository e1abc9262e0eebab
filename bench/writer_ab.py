"""A/B of the writer's tuning choices, in-process, without editing ``writer.py``.

Variants (set on ``vllm_consolidate.write.safetensors`` around ``convert``), alternated inside every repetition,
inputs read once before each run (warm cache), output fsync-ed as usual, median reported:

* ``base``: writer.py as it is;
* ``cast16M``, ``cast1M``, ``cast256K``: cast chunks of that size instead of ``CAST_CHUNK_BYTES`` (only matters
  with a dtype change: smaller chunks keep the read buffer and the cast's result in the core's cache);
* ``no_writeback``: no ``sync_file_range`` per chunk, so the final fsync writes the whole file;
* ``workers1``: one worker thread instead of ``WORKERS``;
* ``no_readahead``: no ``posix_fadvise(WILLNEED)`` ahead of the chunks (``READ_AHEAD_BYTES = 0``; matters on a cold
  cache only: pass ``--cold``).

Usage::

    python bench/writer_ab.py CKPT [--dtype bfloat16] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from vllm_consolidate import dtypes
from vllm_consolidate.convert import ConvertOptions, convert
from vllm_consolidate.write import safetensors as writer

ORIG = {"CAST_CHUNK_BYTES": writer.CAST_CHUNK_BYTES, "WORKERS": writer.WORKERS,
        "start_writeback": writer.start_writeback, "READ_AHEAD_BYTES": writer.READ_AHEAD_BYTES}
VARIANTS = {
    "base": {},
    "cast16M": {"CAST_CHUNK_BYTES": 16 * 2**20},
    "cast1M": {"CAST_CHUNK_BYTES": 2**20},
    "cast256K": {"CAST_CHUNK_BYTES": 2**18},
    "no_writeback": {"start_writeback": lambda fd, offset, nbytes: None},
    "workers1": {"WORKERS": 1},
    "no_readahead": {"READ_AHEAD_BYTES": 0},
}


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Patch the writer for one variant."""
    for attr, value in VARIANTS[name].items():
        setattr(writer, attr, value)
    try:
        yield
    finally:
        for attr, value in ORIG.items():
            setattr(writer, attr, value)


def main() -> None:
    """Alternate the variants and print medians of the conversion time."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="evict the rank files from the page cache before each run")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / ".cache" / "bench-work" / "ab")
    args = ap.parse_args()
    times: dict[str, list[float]] = {n: [] for n in args.variants}
    loads: list[float] = []
    args.work.mkdir(parents=True, exist_ok=True)
    for _ in range(args.reps):
        for name in args.variants:
            out = args.work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            for f in sorted(args.ckpt.rglob("*optim_states.pt")):
                with open(f, "rb", buffering=0) as fh:
                    if args.cold:  # evicted: every byte comes from the disk
                        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                        continue
                    while fh.read(16 * 2**20):  # warm
                        pass
            loads.append(os.getloadavg()[0])
            with variant(name):
                t0 = time.monotonic()
                convert(ConvertOptions(input=args.ckpt, output=out, dtype=dtypes.BY_NAME[args.dtype],
                                       validate=False, base_model_name=None))
                times[name].append(time.monotonic() - t0)
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"dtype": args.dtype, "reps": args.reps, "cold": args.cold,
                      "loadavg_range": [min(loads), max(loads)],
                      "median_s": {n: round(statistics.median(v), 3) for n, v in times.items()},
                      "all_s": {n: [round(x, 3) for x in v] for n, v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
