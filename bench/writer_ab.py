"""A/B of candidate writer tweaks, in-process, without editing ``writer.py``.

Variants (monkeypatched around ``vllm_consolidate.convert.convert``), alternated inside every
repetition, median reported, output fsync-ed as usual:

* ``base``: writer.py as it is;
* ``threads1``: ``torch.set_num_threads(1)`` while writing (the writer already runs 2 workers, and
  each worker's cast otherwise starts an OpenMP team on the same 2 cores);
* ``anydone``: ``_run_jobs`` waits for *any* finished job (``FIRST_COMPLETED``) instead of the oldest,
  so one slow chunk does not leave the other worker idle with an empty queue;
* ``both``: the two together.

Usage::

    python bench/writer_ab.py CKPT [--dtype bfloat16] [--reps 5]
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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from vllm_consolidate import writer
from vllm_consolidate.convert import ConvertOptions, convert

ORIG_RUN_JOBS = writer._run_jobs
ORIG_WRITE = writer.write_safetensors_file


def run_jobs_anydone(files, out_fd: int, jobs, progress) -> None:  # noqa: ANN001 - mirrors writer._run_jobs
    """``writer._run_jobs`` with the same window, refilled as soon as any job finishes."""
    with ThreadPoolExecutor(max_workers=writer.WORKERS, thread_name_prefix="vllmc-write") as pool:
        pending: set[Future[int]] = set()
        for job in jobs:
            pending.add(pool.submit(writer._run_job, files, out_fd, job))
            if len(pending) >= 2 * writer.WORKERS:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    n = fut.result()
                    if progress:
                        progress(n)
        for fut in pending:
            n = fut.result()
            if progress:
                progress(n)


def write_threads1(*args, **kwargs) -> None:  # noqa: ANN002, ANN003 - mirrors writer.write_safetensors_file
    """``write_safetensors_file`` with one intra-op thread per worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ORIG_WRITE(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Patch the writer for one variant."""
    writer._run_jobs = run_jobs_anydone if name in ("anydone", "both") else ORIG_RUN_JOBS
    writer.write_safetensors_file = write_threads1 if name in ("threads1", "both") else ORIG_WRITE
    try:
        yield
    finally:
        writer._run_jobs = ORIG_RUN_JOBS
        writer.write_safetensors_file = ORIG_WRITE


def main() -> None:
    """Alternate the variants and print medians of the conversion time."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/work/main/.cache/bench-work/ab"))
    args = ap.parse_args()
    names = ("base", "threads1", "anydone", "both")
    times: dict[str, list[float]] = {n: [] for n in names}
    loads: list[float] = []
    args.work.mkdir(parents=True, exist_ok=True)
    for _ in range(args.reps):
        for name in names:
            out = args.work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            for f in sorted(p for p in args.ckpt.rglob("*optim_states.pt")):  # warm
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(16 * 2**20):
                        pass
            loads.append(os.getloadavg()[0])
            with variant(name):
                t0 = time.monotonic()
                convert(ConvertOptions(input=args.ckpt, output=out, dtype=getattr(torch, args.dtype),
                                       validate=False, base_model_name=None))
                times[name].append(time.monotonic() - t0)
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"dtype": args.dtype, "chunk_bytes": writer.CHUNK_BYTES, "reps": args.reps,
                      "loadavg_range": [min(loads), max(loads)],
                      "median_s": {n: round(statistics.median(v), 3) for n, v in times.items()},
                      "all_s": {n: [round(x, 3) for x in v] for n, v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
