"""Pure logic of :func:`vllm_consolidate.read.chunks.assemble`: pieces of a tensor -> row-major byte ranges.

The bytes are synthetic (a numpy array cut into boxes and laid out in a buffer as a trainer would store
them); the readers that build real pieces from FSDP, DCP and verl files are tested on the real corpus.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError
from vllm_consolidate.formats.torch_standins import StorageRef, TensorRef
from vllm_consolidate.read.chunks import Piece, assemble, check_tiling


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
    ((4, 5, 6), [[1, 3], [2], [4]], 40),  # every dim split, uneven: each range's piece and row stride differ
    ((3, 4, 8), [[], [], [2, 5]], 36),  # TP column split of a stacked [layers, rows, cols] weight
    ((4, 6), [[], []], 1),  # replicated: one piece
])
def test_assemble_rebuilds_the_tensor(shape, cuts, max_segments):
    full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    buffer, pieces = _store(full, _grid(shape, cuts))
    segments = assemble(shape, pieces, "w")
    assert len(segments) <= max_segments
    np.testing.assert_array_equal(_rebuild(buffer, segments, shape), full)



def test_assemble_rebuilds_random_tilings():
    """Random grid tilings of 1-4 dimensions, pieces stored in shuffled order: the ranges rebuild the tensor, and
    none could be merged with the next (the per-column fast path of ``_runs`` against numpy's own slicing)."""
    rng = np.random.default_rng(2)
    for _ in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 6, size=int(rng.integers(1, 5))))
        cuts = [sorted(rng.choice(np.arange(1, n), size=int(rng.integers(0, min(n, 3))), replace=False).tolist())
                if n > 1 else [] for n in shape]
        full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
        buffer, pieces = _store(full, _grid(shape, cuts))
        segments = assemble(shape, [pieces[i] for i in rng.permutation(len(pieces))], "w")
        np.testing.assert_array_equal(_rebuild(buffer, segments, shape), full)
        assert all(a.offset + a.nbytes != b.offset for a, b in zip(segments, segments[1:])), (shape, cuts)

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


# -- check_tiling: the layout from the boxes alone, before any piece is opened ----------------------------

def _cover(shape: tuple[int, ...], boxes: list) -> np.ndarray:
    cover = np.zeros(shape, np.int64)
    for offsets, sizes in boxes:
        cover[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] += 1
    return cover


def test_check_tiling_agrees_with_counting_every_element():
    """Random boxes and (perturbed) grid tilings: accepted exactly when every element is covered once."""
    rng = np.random.default_rng(0)
    verdicts = {True: 0, False: 0}
    for _ in range(3000):
        shape = tuple(int(n) for n in rng.integers(1, 5, size=int(rng.integers(1, 4))))
        cuts = [sorted(rng.choice(np.arange(1, n), size=int(rng.integers(0, n)), replace=False).tolist()) if n > 1
                else [] for n in shape]
        boxes = _grid(shape, cuts)
        change = int(rng.integers(0, 4))
        if change == 1:  # one box moved back by one along a dimension where it can
            k, d = int(rng.integers(len(boxes))), int(rng.integers(len(shape)))
            offsets, sizes = boxes[k]
            if offsets[d]:
                boxes[k] = (offsets[:d] + (offsets[d] - 1,) + offsets[d + 1:], sizes)
        elif change == 2:
            boxes.append(boxes[int(rng.integers(len(boxes)))])
        elif change == 3 and len(boxes) > 1:
            boxes.pop(int(rng.integers(len(boxes))))
        boxes = [boxes[i] for i in rng.permutation(len(boxes))]
        exact = bool((_cover(shape, boxes) == 1).all())
        try:
            check_tiling(shape, boxes, "w")
            accepted = True
        except CorruptCheckpointError:
            accepted = False
        assert accepted == exact, (shape, boxes)
        verdicts[exact] += 1
    assert min(verdicts.values()) > 500, verdicts  # both verdicts well exercised


def test_check_tiling_is_n_log_n():
    """60,000 one-element boxes (the hostile .metadata of issue 22), a 245 x 245 grid, and a staggered
    brick wall of 20,000 boxes (whose cut grid would have 100 million cells): each checked in well under
    a second when idle; the bound is generous for a loaded machine."""
    import time

    n = 60_000
    ones = [((k,), (1,)) for k in np.random.default_rng(1).permutation(n).tolist()]
    grid = _grid((245, 245), [list(range(1, 245))] * 2)
    rows, width = 10_000, 4  # row r: two bricks of 4 columns in a row of 8, the cut shifted by r % 4
    bricks = [((r, 0), (1, 1 + r % 4)) for r in range(rows)] + [((r, 1 + r % 4), (1, 7 - r % 4)) for r in range(rows)]
    bad = ones[:-1] + [((n - 2,), (2,))]  # the last element missing, its neighbour stored twice
    for shape, boxes, ok in (((n,), ones, True), ((245, 245), grid, True), ((rows, 2 * width), bricks, True),
                             ((n,), bad, False)):
        started = time.process_time()
        if ok:
            check_tiling(shape, boxes, "w")
        else:
            with pytest.raises(CorruptCheckpointError, match="overlap"):
                check_tiling(shape, boxes, "w")
        seconds = time.process_time() - started
        assert seconds < 5, f"{len(boxes):,} boxes of {shape}: {seconds:.2f} s of CPU"


def test_check_tiling_caps_the_corners():
    """Boxes splitting many dimensions: refused from their count, before anything is sorted."""
    shape = (2,) * 12  # 4,096 unit boxes: a real tiling, but 4,096 x 2**12 corners
    boxes = [(tuple((k >> d) & 1 for d in range(12)), (1,) * 12) for k in range(2 ** 12)]
    with pytest.raises(UnsupportedCheckpointError, match="split along 12 dimensions"):
        check_tiling(shape, boxes, "w")
