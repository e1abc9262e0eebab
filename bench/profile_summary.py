"""Summarise a py-spy speedscope profile of ``vllm-consolidate convert`` by where time goes.

Each sample (per thread, py-spy ``--threads --idle``) is attributed to the first matching category,
looking from the innermost frame outwards: a system call or cast inside ``writer.py``, the fsync,
metadata unpickling, imports, planning, or "other". Worker threads idle in the pool are counted as
``idle``.

Usage::

    python bench/profile_summary.py bench/results/profile_float32.speedscope.json [...]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# (category, predicate on "name file:line" of one frame), checked innermost frame first.
RULES: list[tuple[str, tuple[str, ...]]] = [
    # py-spy records Python frames, so a system call shows as the writer function that makes it.
    ("copy_file_range (same dtype)", ("copy_file_range", "_copy_bytes ")),
    ("preadv (read fp32)", ("preadv", "read_into ")),
    ("start writeback (sync_file_range)", ("start_writeback", "sync_file_range")),
    ("cast (numpy / ml_dtypes)", ("cast_into", "copyto", "_cast ")),
    ("pwrite", ("pwrite", "_run_job ")),
    ("fsync", ("fsync",)),
    ("unpickle metadata (torch_zip)", ("torch_zip.py", "load_lazy")),
    ("reader (deepspeed.py)", ("deepspeed.py",)),
    ("planner", ("planner.py",)),
    ("imports", ("_find_and_load", "importlib", "<module>")),
    ("base model / tokenizer lookup (assets.py)", ("assets.py",)),
    ("idle (pool wait / lock)", ("wait", "_worker", "acquire")),
]


def categorise(frames: list[str]) -> str:
    """The category of one stack (outermost first)."""
    for frame in reversed(frames):
        for cat, needles in RULES:
            if any(n in frame for n in needles):
                return cat
    return "other"


def summarise(path: Path) -> dict[str, dict[str, float]]:
    """Per thread, the share of samples per category (percent)."""
    data = json.loads(path.read_text())
    frames = [f"{f['name']} {f.get('file', '')}:{f.get('line', '')}" for f in data["shared"]["frames"]]
    out: dict[str, dict[str, float]] = {}
    for prof in data["profiles"]:
        counts: Counter[str] = Counter()
        weights = prof.get("weights") or [1] * len(prof["samples"])
        for stack, w in zip(prof["samples"], weights):
            counts[categorise([frames[i] for i in stack])] += w
        total = sum(counts.values()) or 1
        out[prof["name"]] = {k: round(100 * v / total, 1) for k, v in counts.most_common()}
        out[prof["name"]]["_samples"] = total
    return out


def main() -> None:
    """Print the summary of every profile given."""
    for arg in sys.argv[1:]:
        print(arg)
        for thread, cats in summarise(Path(arg)).items():
            print(f"  {thread}: {json.dumps(cats)}")


if __name__ == "__main__":
    main()
