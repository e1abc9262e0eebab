"""Pure logic of :func:`vllm_consolidate.read.chunks.assemble`: pieces of a tensor -> row-major byte ranges.

The bytes are synthetic (a numpy array cut into boxes and laid out in a buffer as a trainer would store
them); the readers that build real pieces from FSDP, DCP and verl files are tested on the real corpus.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.formats.torch_standins import StorageRef, TensorRef
from vllm_consolidate.read.chunks import Piece, assemble


def _store(full: np.ndarray, boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[bytes, list[Piece]]:
    """Lay each box of ``full`` out contiguously in one buffer, in a shuffled order; return buffer and pieces."""
    buffer, pieces = bytearray(), []
    for i, (offsets, sizes) in enumerate(reversed(boxes)):
        block = np.ascontiguousarray(full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))])
        start = len(buffer)
        buffer += b"\xee" * 3 + block.tobytes()  # junk before each piece: offsets must be honoured
        storage = StorageRef("buf", str(i), dtypes.float32, block.size, start + 3)
        stride = tuple(int(np.prod(sizes[d + 1:])) for d in range(len(sizes)))
        pieces.append(Piece(offsets, sizes, TensorRef(storage, 0, sizes, stride)))
    return bytes(buffer), pieces


def _grid(shape: tuple[int, ...], cuts: list[list[int]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    bounds = [[0, *c, n] for c, n in zip(cuts, shape)]
    out = []
    for cell in itertools.product(*(range(len(b) - 1) for b in bounds)):
        offsets = tuple(b[i] for b, i in zip(bounds, cell))
        sizes = tuple(b[i + 1] - b[i] for b, i in zip(bounds, cell))
        out.append((offsets, sizes))
    return out


def _rebuild(buffer: bytes, segments: list, shape: tuple[int, ...]) -> np.ndarray:
    data = b"".join(buffer[s.offset:s.offset + s.nbytes] for s in segments)
    return np.frombuffer(data, dtype=np.float32).reshape(shape)


@pytest.mark.parametrize(("shape", "cuts", "max_segments"), [
    ((11, 8), [[6], []], 2),  # FSDP Shard(0), uneven: one range per piece
    ((11, 8), [[3, 6, 9], []], 4),
    ((7,), [[4]], 2),  # 1-D bias
    ((6, 10), [[], [4]], 12),  # tensor-parallel column split: one range per row and piece
    ((5, 6, 4), [[2], [3], []], 20),  # two split dims
    ((4, 6), [[], []], 1),  # replicated: one piece
])
def test_assemble_rebuilds_the_tensor(shape, cuts, max_segments):
    full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    buffer, pieces = _store(full, _grid(shape, cuts))
    segments = assemble(shape, pieces, "w")
    assert len(segments) <= max_segments
    np.testing.assert_array_equal(_rebuild(buffer, segments, shape), full)


def test_overlapping_pieces_are_refused():
    full = np.zeros((4, 2), np.float32)
    _, pieces = _store(full, [((0, 0), (3, 2)), ((2, 0), (2, 2))])
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        assemble((4, 2), pieces, "w")


def test_a_gap_is_refused():
    full = np.zeros((4, 2), np.float32)
    _, pieces = _store(full, [((0, 0), (1, 2)), ((2, 0), (2, 2))])
    with pytest.raises(CorruptCheckpointError, match="uncovered"):
        assemble((4, 2), pieces, "w")


def test_a_piece_whose_tensor_disagrees_is_refused():
    full = np.zeros((4, 2), np.float32)
    _, pieces = _store(full, [((0, 0), (2, 2)), ((2, 0), (2, 2))])
    wrong = Piece((2, 0), (2, 2), TensorRef(pieces[0].data.storage, 0, (1, 2), (2, 1)))
    with pytest.raises(CorruptCheckpointError, match="holds a tensor of shape"):
        assemble((4, 2), [pieces[1], wrong], "w")


def test_a_piece_outside_the_shape_is_refused():
    full = np.zeros((4, 2), np.float32)
    _, pieces = _store(full, [((0, 0), (4, 2))])
    shifted = Piece((1, 0), (4, 2), pieces[0].data)
    with pytest.raises(CorruptCheckpointError, match="does not fit"):
        assemble((4, 2), [shifted], "w")
