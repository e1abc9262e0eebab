"""``convert`` to a local folder vs to ``s3://`` (moto_server on loopback): wall, peak RSS, local bytes written.

Each run is a CLI subprocess (``--no-validate-vllm``, so both sides do the same work); the input is read once
before the runs (warm cache). Per run: wall seconds, peak RSS (``VmHWM`` read just before exit, via a wrapper),
and the bytes the process made the kernel write to local storage (``/proc/PID/io`` ``write_bytes``: the output
folder for a local run; for an ``s3://`` run anything beyond 0 would be local staging). The moto server keeps
objects in its own memory, so its cost is in the wall time only.

Usage::

    python bench/s3_output.py CKPT [--reps 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import s3_server  # noqa: E402

# Runs the CLI in-process and writes its own peak RSS and write_bytes (after the run, before exit) to a pipe.
_WRAPPER = """
import os, sys
from vllm_consolidate import cli
fd = int(sys.argv[1])
code = cli.main(sys.argv[2:])
io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
os.write(fd, f"{int(hwm) * 1024} {io['write_bytes'].strip()}".encode())
sys.exit(code)
"""


def run(args: list[str], env: dict[str, str]) -> dict[str, float]:
    r, w = os.pipe()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(w), *args], env=env, pass_fds=(w,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    os.close(w)
    _, err = proc.communicate()
    wall = time.monotonic() - started
    report = os.read(r, 200).decode().split()
    os.close(r)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(int(report[0]) / 2**20), "local_write_mb":
            round(int(report[1]) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    for f in a.ckpt.rglob("*"):  # warm the page cache for both sides alike
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    results: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
    with s3_server.start() as srv, tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        env = {**os.environ, **srv.env}
        srv.client().create_bucket(Bucket="bench")
        common = ["convert", "--input", str(a.ckpt), "--no-validate-vllm", "--dtype", a.dtype]
        for i in range(a.reps):
            out = Path(tmp) / f"out{i}"
            results["local"].append(run([*common, "--output", str(out)], env))
            shutil.rmtree(out)
            results["s3"].append(run([*common, "--output", f"s3://bench/{uuid.uuid4().hex[:8]}/m"], env))
    summary = {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in results.items()}
    print(json.dumps({"runs": results, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
