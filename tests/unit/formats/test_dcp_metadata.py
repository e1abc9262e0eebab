"""What :func:`vllm_consolidate.formats.dcp.read_metadata` checks from a ``.metadata`` alone.

The files are hand-built opcode by opcode (:func:`tests.test_hostile_fsdp.build_metadata`); no storage
file exists, so anything refused here is refused before one could be opened.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.test_hostile_fsdp import build_metadata

from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.formats.dcp import read_metadata


def _write(tmp_path: Path, tensors: dict) -> Path:
    (tmp_path / ".metadata").write_bytes(build_metadata(tensors))
    return tmp_path


def test_a_built_metadata_reads_back(tmp_path: Path) -> None:
    """Control: the builder writes what the reader reads (two chunks of a (4, 3) float32)."""
    chunks = [((0, 0), (2, 3), "a.distcp", 0, 900), ((2, 0), (2, 3), "b.distcp", 0, 900)]
    meta = read_metadata(_write(tmp_path, {"model.w": ((4, 3), chunks)}))
    tensor = meta.tensors["model.w"]
    assert tensor.shape == (4, 3) and tensor.dtype.name == "float32"
    assert [(c.offsets, c.sizes, c.file, c.offset, c.length) for c in tensor.chunks] == chunks


def test_a_chunk_stored_in_fewer_bytes_than_it_holds_is_refused(tmp_path: Path) -> None:
    """Rows 2..3 of a (4, 3) float32 are 24 bytes: an archive of 23 bytes cannot hold them."""
    chunks = [((0, 0), (2, 3), "a.distcp", 0, 900), ((2, 0), (2, 3), "a.distcp", 900, 23)]
    with pytest.raises(CorruptCheckpointError, match="stored in 23 bytes, fewer than its 24 bytes"):
        read_metadata(_write(tmp_path, {"model.w": ((4, 3), chunks)}))


def test_identical_small_pickles_are_scanned_once_and_refusals_never_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DCP save holds thousands of identical chunk pickles: the pre-pass runs once for them. A refused
    pickle is refused again on every load (nothing about it is remembered)."""
    from vllm_consolidate.errors import UnsafePickleError
    from vllm_consolidate.formats import torch_zip

    calls = []
    real = torch_zip.scan_pickle
    monkeypatch.setattr(torch_zip, "scan_pickle", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(torch_zip, "_SCANNED", type(torch_zip._SCANNED)())
    good = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s."  # {"a": 1}
    bad = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R."  # os.system("true")
    assert [torch_zip.load_pickle(good, "x", torch_zip._DEFAULT) for _ in range(3)] == [{"a": 1}] * 3
    assert len(calls) == 1
    for _ in range(2):
        with pytest.raises(UnsafePickleError, match="allowlist"):
            torch_zip.load_pickle(bad, "x", torch_zip._DEFAULT)
    assert len(calls) == 3
