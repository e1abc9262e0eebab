"""Issue 4's claim, measured: merging HF shards by byte copy vs a Python round trip.

Usage: ``.venv/bin/python bench/merge_vs_roundtrip.py SHARDED_DIR [--reps 3]``

SHARDED_DIR holds ``model-0000i-of-0000N.safetensors`` + index + config (e.g. our own output with
``--max-shard-size 500MB``). Alternates, with the inputs in the page cache for both:

* ours: ``consolidate-for-vllm --input SHARDED_DIR`` (kernel byte copy, no dtype change);
* round trip: ``safetensors.torch.load_file`` of every shard, then ``save_file`` and fsync.

Prints wall time and peak RSS (``/usr/bin/time``) for each, and the medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUND_TRIP = """
import glob, os, sys
from safetensors.torch import load_file, save_file
state = {}
for f in sorted(glob.glob(sys.argv[1] + "/model-*.safetensors")):
    state.update(load_file(f))
save_file(state, sys.argv[2] + "/model.safetensors", metadata={"format": "pt"})
os.fsync(os.open(sys.argv[2] + "/model.safetensors", os.O_RDONLY))
"""


def _timed(cmd: list[str]) -> tuple[float, int]:
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, check=True)
    wall, rss_kb = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sharded", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    results: dict[str, list[tuple[float, int]]] = {"ours": [], "round_trip": []}
    with tempfile.TemporaryDirectory(dir=args.sharded.parent) as tmp:
        for _ in range(args.reps):
            for f in args.sharded.glob("*.safetensors"):  # same page-cache state for both
                f.read_bytes()
            out = Path(tmp) / "ours"
            results["ours"].append(_timed([str(bin_dir / "consolidate-for-vllm"), "--input", str(args.sharded),
                                           "--output", str(out), "--no-validate-vllm"]))
            shutil.rmtree(out)
            out.mkdir()
            results["round_trip"].append(_timed([sys.executable, "-c", ROUND_TRIP, str(args.sharded), str(out)]))
            shutil.rmtree(out)
    for name, runs in results.items():
        print(f"{name:10s} wall {statistics.median(w for w, _ in runs):6.2f} s   "
              f"peak RSS {statistics.median(r for _, r in runs):6d} MiB   runs {runs}")


if __name__ == "__main__":
    main()
