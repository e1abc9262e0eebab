"""A/B of two source trees on one command's start-up, run alternately from outside.

Each repetition runs ``python -m vllm_consolidate ARGS`` with ``PYTHONPATH=A`` and with ``PYTHONPATH=B`` (order
alternating), twice each: once plain, for the wall time and the child's CPU seconds, and once under
``-X importtime``, for the time spent importing (the sum of its top-level cumulative entries; also without
numpy's, which only a cast loads). Bytecode is cached under a private prefix, as an installed package has it.
``OUT`` in the arguments becomes a fresh output folder, removed after each run. Paired runs see the same load,
so their differences mean something on a shared machine where absolute times do not.

Usage::

    .venv/bin/python bench/startup_ab.py --a /tmp/old/src --b src --reps 20 -- \\
        convert --input CKPT --output OUT --dtype bfloat16 --no-validate-vllm --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _imports_ms(stderr: str) -> tuple[float, float]:
    """``(all, without numpy)`` milliseconds of imports from ``-X importtime``'s top-level entries."""
    total = numpy = 0
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cumulative, name = line.split("|")
        if len(name) - len(name.lstrip(" ")) != 1:  # nested: counted in its top-level entry's cumulative time
            continue
        total += int(cumulative)
        numpy += int(cumulative) if name.strip().split(".")[0] == "numpy" else 0
    return total / 1000, (total - numpy) / 1000


def _run(tree: str, args: list[str], work: Path, importtime: bool) -> dict[str, float]:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "",
           "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "vllm_consolidate",
           *[str(out) if a == "OUT" else a for a in args]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    if importtime:
        return dict(zip(("imports_ms", "imports_without_numpy_ms"), _imports_ms(proc.stderr)))
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"wall_ms": wall * 1000, "cpu_ms": cpu * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="source tree A (a folder holding vllm_consolidate/)")
    ap.add_argument("--b", required=True, help="source tree B")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the command line after --")
    opts = ap.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory(prefix="vllmc-startup-ab-") as tmp:
        work = Path(tmp)
        for side in ("a", "b"):  # compile the bytecode once, outside the measurement
            _run(getattr(opts, side), args, work, importtime=False)
        for rep in range(opts.reps):
            for side in (("a", "b") if rep % 2 == 0 else ("b", "a")):
                tree = getattr(opts, side)
                runs[side].append({**_run(tree, args, work, False), **_run(tree, args, work, True)})
    keys = ("wall_ms", "cpu_ms", "imports_ms", "imports_without_numpy_ms")
    print(json.dumps({
        "args": args, "reps": opts.reps, "a": opts.a, "b": opts.b,
        "median": {side: {k: round(statistics.median(r[k] for r in v), 1) for k in keys} for side, v in runs.items()},
        "median_a_minus_b": {k: round(statistics.median(a[k] - b[k] for a, b in zip(runs["a"], runs["b"])), 1)
                             for k in keys},
        "load": round(os.getloadavg()[0], 1),
    }, indent=1))


if __name__ == "__main__":
    main()
