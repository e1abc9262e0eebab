"""A/B of two source trees on one conversion, run alternately from outside (start-up included).

Each repetition runs ``vllm-consolidate convert`` once with ``PYTHONPATH=A`` and once with ``PYTHONPATH=B``
(order alternating), on a warm page cache (the rank files are read first), validation off, and records the
wall time, the child's CPU seconds (user + system), the peak RSS of the child and the conversion's own
``seconds``. Paired runs see the same load, so
their ratio means something on a shared machine where absolute times do not.

Usage::

    .venv/bin/python bench/ab_trees.py --a /tmp/old/src --b src --input CKPT --dtype bfloat16 --reps 5
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
import time
from pathlib import Path


def _warm(ckpt: Path) -> None:
    for f in sorted(ckpt.rglob("*optim_states.pt")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 * 2**20):
                pass


def _children_cpu() -> float:
    # User + system CPU seconds of the children waited for: on a shared machine the CPU a conversion needs is
    # disturbed far less by the other jobs than its wall time is.
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run(src: str, args: argparse.Namespace, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    _warm(args.input)
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vllm_consolidate", "convert", "--input", str(args.input), "--output", str(out),
           "--dtype", args.dtype, "--no-validate-vllm", "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cpu0 = _children_cpu()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{src}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far: see note below
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "cpu": cpu, "seconds": json.loads(proc.stdout)["seconds"],
            "maxrss_kib_so_far": max(before, peak), "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="source tree A (a folder holding vllm_consolidate/)")
    ap.add_argument("--b", required=True, help="source tree B")
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path(".cache/bench-work/ab_trees"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for rep in range(args.reps):
        order = ("a", "b") if rep % 2 == 0 else ("b", "a")
        for side in order:
            runs[side].append(_run(getattr(args, side), args, args.work / f"out-{side}"))
    ratios = [b["wall"] / a["wall"] for a, b in zip(runs["a"], runs["b"])]
    cpu_ratios = [b["cpu"] / a["cpu"] for a, b in zip(runs["a"], runs["b"])]
    print(json.dumps({
        "input": str(args.input), "dtype": args.dtype, "reps": args.reps, "a": args.a, "b": args.b,
        "median_wall_s": {k: round(statistics.median(r["wall"] for r in v), 3) for k, v in runs.items()},
        "median_seconds": {k: round(statistics.median(r["seconds"] for r in v), 3) for k, v in runs.items()},
        "b_over_a_wall_per_rep": [round(x, 3) for x in ratios],
        "b_over_a_wall_median": round(statistics.median(ratios), 3),
        "median_cpu_s": {k: round(statistics.median(r["cpu"] for r in v), 3) for k, v in runs.items()},
        "b_over_a_cpu_per_rep": [round(x, 3) for x in cpu_ratios],
        "b_over_a_cpu_median": round(statistics.median(cpu_ratios), 3),
        "load": [round(r["load"], 1) for v in runs.values() for r in v],
    }, indent=1))


if __name__ == "__main__":
    main()
