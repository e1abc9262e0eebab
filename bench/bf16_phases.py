"""Where one conversion's time goes, in-process: imports, planning, and per writer thread read / cast / write.

Wraps (for this process only) the writer's steps with timers and runs ``convert`` through the Python API on a
warm page cache (the rank files are read first), validation off, ``--reps`` times in fresh interpreters.
Each run prints the import and conversion seconds, the planning step (``plan_conversion``: in a fresh
interpreter mostly the readers' lazy imports and the base-model lookup), the file's write (``write_file``),
the final ``fsync``, and per writer thread the summed seconds of ``read`` (``read_into``: ``preadv`` from the
page cache into the thread's buffer), ``cast`` (``casts.cast_into``), ``pwrite`` and ``writeback``
(``sync_file_range``). A thread whose steps add up to nearly ``write_file`` is busy all along: the write is
bound by the CPU, not by the disk (whose share then shows as the final ``fsync``).

Timers are wall time inside each thread, so on a shared machine they include time the thread waited for a
core; the load average is printed with each run.

Usage::

    .venv/bin/python bench/bf16_phases.py --input CKPT [--dtype bfloat16] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path


def _instrument(events: list[tuple[str, str, float, float]]) -> tuple[object, object]:
    import importlib

    cv = importlib.import_module("vllm_consolidate.convert")
    from vllm_consolidate.write import safetensors as st

    lock = threading.Lock()

    def wrap(owner: object, name: str, tag: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return inner(*args, **kwargs)
            finally:
                with lock:
                    events.append((tag, threading.current_thread().name, t0, time.monotonic()))

        setattr(owner, name, timed)

    for owner, name, tag in [(st, "write_safetensors_file", "write_file"), (st, "read_gathered", "read"),
                             (st, "_cast", "cast"), (st, "pwrite_all", "pwrite"), (st, "start_writeback", "writeback"),
                             (st.os, "fsync", "fsync"), (cv, "plan_conversion", "plan")]:
        wrap(owner, name, tag)
    return cv, st


def child(ckpt: str, dtype: str) -> None:
    """One measured conversion (run in a fresh interpreter); prints one JSON line."""
    t0 = time.monotonic()
    events: list[tuple[str, str, float, float]] = []
    cv, _ = _instrument(events)
    imported = time.monotonic() - t0
    for f in sorted(Path(ckpt).rglob("*optim_states.pt")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 * 2**20):
                pass
    out = Path(tempfile.mkdtemp(prefix="bf16_phases-", dir=os.environ.get("BENCH_WORK"))) / "out"
    try:
        load = os.getloadavg()[0]
        t1 = time.monotonic()
        cv.convert(cv.ConvertOptions(input=ckpt, output=out, dtype=dtype, validate=False))
        total = time.monotonic() - t1
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    sums: dict[str, float] = defaultdict(float)
    for tag, thread, a, b in events:
        sums[tag if thread == "MainThread" else f"{thread} {tag}"] += b - a
    print(json.dumps({"load": round(load, 2), "import_s": round(imported, 3), "convert_s": round(total, 3),
                      **{k: round(v, 3) for k, v in sorted(sums.items())}}))


def main() -> None:
    """Run ``--reps`` fresh interpreters and print their breakdowns."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.input, args.dtype)
        return
    for _ in range(args.reps):
        os.sync()
        proc = subprocess.run([sys.executable, __file__, "--child", "--input", args.input, "--dtype", args.dtype],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
