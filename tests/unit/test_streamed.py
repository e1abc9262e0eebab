"""storage.streamed: the ranges an object-store output keeps from its upload stream for the validation."""

from __future__ import annotations

import os
import random

import pytest

from vllm_consolidate.storage.streamed import Kept, NotKept, Spill


@pytest.mark.parametrize("memory", [None, 0, 300])  # all in memory; all in the file; some of each
def test_kept_ranges_are_the_streamed_bytes_and_nothing_else(memory):
    data = random.Random(3).randbytes(10_000)
    spill = Spill(memory) if memory is not None else None
    kept = Kept("s3://b/m/x", len(data), [(0, 8), (100, 300), (250, 400), (9_990, 20_000), (5, 6)], spill)
    pos, rng = 0, random.Random(4)
    while pos < len(data):  # pieces of any size, across range boundaries, as the upload is handed them
        n = rng.randint(1, 97)
        kept.feed(data[pos:pos + n])
        pos += n
    assert kept.nbytes == 8 + 300 + 10  # merged and clipped to the object: all that stays in memory
    assert kept.read(0, 8) == data[:8] and kept.read(120, 390) == data[120:390]
    assert kept.read(9_995, 10_500) == data[9_995:]  # clipped to the object's end
    f = kept.open()
    buf = memoryview(bytearray(50))
    assert f.preadv_into(buf, 150) == 50 and bytes(buf) == data[150:200]
    for start, end in [(7, 9), (99, 101), (400, 401), (5_000, 5_001)]:  # never guessed: refused
        with pytest.raises(NotKept):
            kept.read(start, end)
    if spill is not None:  # what did not fit the memory budget is in the (unlinked) file
        assert spill.spilled == {0: 318, 300: 300}[memory]  # 300 did not fit after the first 8: first fit
        spill.close()


def test_spill_file_is_unnamed_and_closed_with_the_output():
    spill = Spill(0)
    assert spill.reserve(5) == 0 and spill.reserve(7) == 5
    spill.pwrite(b"hello", 0)
    assert spill.pread(5, 0) == b"hello"
    fd = spill._fd
    assert fd is not None and os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")
    spill.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert isinstance(Spill(10).reserve(10), bytearray)  # within the budget: memory, no file



def test_short_writes_are_finished_by_the_spill_and_the_writer(monkeypatch, tmp_path):
    """Both keep writing after ``os.pwrite`` writes less than asked (one loop, ``posix_write.pwrite_fd``)."""
    from vllm_consolidate import posix_write
    from vllm_consolidate.write.pwrite import pwrite_all

    real, calls = os.pwrite, []

    def short(fd, data, offset):  # at most 3 bytes a call, as a signal or a file-size limit may leave it
        calls.append(offset)
        return real(fd, memoryview(data)[:3], offset)

    monkeypatch.setattr(posix_write.os, "pwrite", short)
    data = random.Random(5).randbytes(20)
    spill = Spill(0)
    spill.reserve(len(data))
    spill.pwrite(data, 0)
    assert spill.pread(len(data), 0) == data and len(calls) == 7
    spill.close()
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert pwrite_all(fd, memoryview(data), 4) == len(data)
        assert os.pread(fd, 30, 0) == bytes(4) + data
    finally:
        os.close(fd)
