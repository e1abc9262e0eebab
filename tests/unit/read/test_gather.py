""":func:`vllm_consolidate.read.gather.read_gathered`: the same bytes as reading range by range, in fewer reads.

Layouts are synthetic ranges over two real files: the TP row-parallel case (evenly spaced halves of rows, the
strided copy), uneven pieces (the per-range copy), runs broken by gaps, and too few ranges to be worth it.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vllm_consolidate.read import gather
from vllm_consolidate.read.gather import plan_gather, read_gathered
from vllm_consolidate.read.ranges import OpenFiles, read_into
from vllm_consolidate.source import Segment


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    rng = random.Random(0)
    paths = []
    for k in range(2):
        p = tmp_path / f"rank{k}.bin"
        p.write_bytes(bytes(rng.randrange(256) for _ in range(64 * 1024)))
        paths.append(str(p))
    return paths


def _tp_rows(files: list[str], rows: int, half: int) -> list[Segment]:
    return [Segment(files[k], 100 + r * half, half) for r in range(rows) for k in range(2)]


def _uneven(files: list[str], rng: random.Random) -> list[Segment]:
    """Ranges of random lengths, each file's ranges adjacent: runs whose pieces are not evenly spaced."""
    pos, out = [0, 7], []
    for _ in range(200):
        k = rng.randrange(2)
        n = rng.randrange(1, 90)
        out.append(Segment(files[k], pos[k], n))
        pos[k] += n
    return out


def _gappy(files: list[str]) -> list[Segment]:
    """Evenly spaced rows in the destination but a gap in the file every 10 rows: several runs per file."""
    return [Segment(files[k], r * 64 + (r // 10) * 5, 64) for r in range(100) for k in range(2)]


def _read(files: list[str], segs: list[Segment], plan: gather.Gather | None = None) -> bytes:
    buf = bytearray(sum(s.nbytes for s in segs))
    opened = OpenFiles()
    try:
        read_gathered(opened, memoryview(buf), segs, plan)
    finally:
        opened.close()
    return bytes(buf)


def _plain(segs: list[Segment]) -> bytes:
    buf = bytearray(sum(s.nbytes for s in segs))
    opened = OpenFiles()
    try:
        read_into(opened, memoryview(buf), iter(segs))
    finally:
        opened.close()
    return bytes(buf)


@pytest.mark.parametrize("layout", ["tp", "uneven", "gappy", "few"])
def test_the_bytes_equal_reading_each_range(files, monkeypatch, layout):
    segs = {"tp": lambda: _tp_rows(files, 300, 48), "uneven": lambda: _uneven(files, random.Random(1)),
            "gappy": lambda: _gappy(files), "few": lambda: _tp_rows(files, 1, 48)}[layout]()
    calls: list[int] = []
    real = gather.read_into

    def counting(opened, buf, ranges):
        ranges = list(ranges)
        calls.append(len(ranges))
        return real(opened, buf, iter(ranges))

    monkeypatch.setattr(gather, "read_into", counting)
    plan = plan_gather(segs)
    assert _read(files, segs) == _plain(segs)
    assert _read(files, segs, plan=plan) == _plain(segs)
    want_runs = {"tp": 2, "uneven": 2, "gappy": 20, "few": 2}[layout]
    assert len(plan.runs) == want_runs
    if layout == "few":  # 2 ranges in 2 runs: read in place
        assert not plan.worth_it and calls == [2, 2]
    else:
        assert plan.worth_it and calls == [want_runs, want_runs]
    evenly = {"tp": True, "uneven": False, "gappy": True, "few": True}[layout]
    assert all(step is not None for step in plan.steps) == evenly


def test_a_file_ending_early_is_named(files, tmp_path):
    from vllm_consolidate.errors import CorruptCheckpointError

    segs = _tp_rows(files, 2000, 48)  # past the end of the 64 KiB files
    with pytest.raises(CorruptCheckpointError, match="file ended early"):
        _read(files, segs)
