"""Assembling a full tensor from the pieces that sharded training stored, as byte ranges.

FSDP, DCP and verl store each tensor as pieces (chunks): a box of the full tensor (offsets and sizes
per dimension) whose elements are saved contiguously, row-major, in some file. :func:`assemble`
turns the pieces of one tensor into the byte ranges whose concatenation is the full tensor,
row-major: the form every reader hands the planner (:class:`~vllm_consolidate.source.TensorSpec`).
Nothing is read.

Pieces must tile the tensor exactly: every element in one piece, none in two. :func:`check_tiling`
decides that from the boxes alone, in O(n log n) for n pieces, so a reader can refuse a forged layout
before it opens a single piece's file. FSDP's row shards (``Shard(0)``) become one range per piece; a
split along a later dimension (tensor parallelism) becomes one range per row of the earlier
dimensions, capped at :data:`MAX_SEGMENTS`.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError
from vllm_consolidate.formats.torch_zip import TensorRef
from vllm_consolidate.limits import brief
from vllm_consolidate.source import Segment

#: Byte ranges for one tensor (a 150k-row embedding split by columns over 16 ranks is 2.4 M).
MAX_SEGMENTS = 1 << 23
#: Grid cells the pieces of one tensor may cut it into, to map each byte range to its piece.
MAX_CELLS = 1 << 20
#: Box corners the tiling check may sort for one tensor: pieces x 2 ** (dimensions split). Real
#: layouts split one or two dimensions (8,192 pieces of FSDP x TP on 1,024 ranks: 32,768 corners).
MAX_CORNERS = 1 << 20

Box = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Piece:
    """One stored box of a tensor.

    Attributes:
        offsets: Where the box starts in the full tensor, per dimension.
        sizes: The box's size per dimension.
        data: Its stored elements (contiguous, row-major, ``sizes`` elements).
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    data: TensorRef


def _corner_keys(box: Box, split: list[int], radix: list[int]) -> tuple[list[int], list[int]]:
    """The corners of ``box`` on the ``split`` dimensions, as mixed-radix integers: (+1 corners, -1 corners).

    A box ``[o, o + s)`` is the signed sum of the orthants ``x >= c`` at its 2**k corners: + where an
    even number of coordinates are ``o + s``, - where odd (inclusion-exclusion).
    """
    plus, minus = [0], []
    for d, r in zip(split, radix):
        low, high = box[0][d] * r, (box[0][d] + box[1][d]) * r
        plus, minus = [k + low for k in plus] + [k + high for k in minus], [k + low for k in minus] + [
            k + high for k in plus]
    return plus, minus


def check_tiling(shape: Sequence[int], boxes: Sequence[Box], where: str) -> None:
    """Check that ``(offsets, sizes)`` boxes tile ``shape`` exactly, from the boxes alone.

    Every box is the signed sum of the orthants at its corners, and orthants at distinct points are
    linearly independent. So the boxes' indicator functions add up to the tensor's exactly (every
    element in one box, none in two, none outside) if and only if the boxes' signed corners cancel
    down to the tensor's own. That is two sorted lists compared: O(n log n), however the boxes are
    laid out. Dimensions no box splits are left out (each would double the corners).

    Raises:
        CorruptCheckpointError: A box does not fit the shape, two boxes overlap, or part is uncovered.
        UnsupportedCheckpointError: The boxes split so many dimensions that the corners pass
            :data:`MAX_CORNERS`.
    """
    shape = tuple(shape)
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise CorruptCheckpointError(f"a piece of {where} (offsets {brief(offsets)}, sizes {brief(sizes)}) "
                                         f"does not fit its shape {shape}")
    total = math.prod(shape)
    boxes = [b for b in boxes if math.prod(b[1])]  # an empty box holds nothing and covers nothing
    volume = sum(math.prod(b[1]) for b in boxes)
    if volume < total:
        raise CorruptCheckpointError(f"the stored pieces of {where} leave part of it uncovered")
    if total == 0:
        return
    split = [d for d, n in enumerate(shape) if any(b[0][d] != 0 or b[1][d] != n for b in boxes)]
    if len(boxes) << len(split) > MAX_CORNERS:
        raise UnsupportedCheckpointError(
            f"{where} is stored as {len(boxes):,} pieces split along {len(split)} dimensions, more than supported")
    radix = [math.prod(shape[d] + 1 for d in split[:i]) for i in range(len(split))]
    plus, minus = _corner_keys((tuple(0 for _ in shape), shape), split, radix)
    plus, minus = minus, plus  # the tensor's own corners, subtracted
    for box in boxes:
        p, m = _corner_keys(box, split, radix)
        plus += p
        minus += m
    # With every box inside the tensor, no overlap and the full volume leave no gap: any other
    # mismatch has some element in two boxes.
    if volume > total or sorted(plus) != sorted(minus):
        raise CorruptCheckpointError(f"two stored pieces of {where} overlap")


def _intervals(shape: Sequence[int], pieces: Sequence[Piece]) -> list[list[int]]:
    """Per dimension, the sorted cut points (0, every piece boundary, the size)."""
    cuts = [{0, n} for n in shape]
    for p in pieces:
        for d, (o, s) in enumerate(zip(p.offsets, p.sizes)):
            cuts[d].update((o, o + s))
    return [sorted(c) for c in cuts]


def _owner_of_cells(shape: tuple[int, ...], pieces: Sequence[Piece], cuts: list[list[int]], where: str,
                    ) -> dict[tuple[int, ...], int]:
    """``{cell index: piece index}``, checking that every cell of the grid lies in exactly one piece."""
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells > MAX_CELLS:
        raise UnsupportedCheckpointError(f"{where} is cut into {cells:,} pieces, more than supported ({MAX_CELLS:,})")
    owner: dict[tuple[int, ...], int] = {}
    for i, p in enumerate(pieces):
        ranges = [range(bisect.bisect_left(c, o), bisect.bisect_left(c, o + s))
                  for c, o, s in zip(cuts, p.offsets, p.sizes)]
        for cell in itertools.product(*ranges):
            if cell in owner:
                raise CorruptCheckpointError(f"two stored pieces of {where} overlap (at offsets {p.offsets})")
            owner[cell] = i
    if len(owner) != cells:
        raise CorruptCheckpointError(f"the stored pieces of {where} leave part of it uncovered")
    return owner


def _check_piece(piece: Piece, shape: tuple[int, ...], where: str) -> None:
    if len(piece.offsets) != len(shape) or len(piece.sizes) != len(shape) or any(
            o + s > n for o, s, n in zip(piece.offsets, piece.sizes, shape)):
        raise CorruptCheckpointError(f"a piece of {where} (offsets {brief(piece.offsets)}, sizes "
                                     f"{brief(piece.sizes)}) does not fit its shape {shape}")
    if piece.data.numel != math.prod(piece.sizes) or tuple(d for d in piece.data.shape if d != 1) != tuple(
            d for d in piece.sizes if d != 1):
        raise CorruptCheckpointError(f"a piece of {where} holds a tensor of shape {piece.data.shape}, but the "
                                     f"checkpoint says {piece.sizes}", path=piece.data.storage.path)


def _merge(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1].path == seg.path and out[-1].offset + out[-1].nbytes == seg.offset:
            out[-1] = Segment(seg.path, out[-1].offset, out[-1].nbytes + seg.nbytes)
        elif seg.nbytes:
            out.append(seg)
    return out


def assemble(shape: tuple[int, ...], pieces: Sequence[Piece], where: str) -> list[Segment]:
    """The byte ranges whose concatenation is the full tensor, row-major.

    Args:
        shape: The full tensor's shape.
        pieces: Its stored pieces, in any order; each piece's data must be contiguous.
        where: The tensor's name, for errors.

    Raises:
        CorruptCheckpointError: The pieces overlap, leave a gap, do not fit the shape, or disagree
            with their stored tensors.
        UnsupportedCheckpointError: The pieces cut the tensor finer than supported.
    """
    shape = tuple(shape)
    if not pieces:
        raise CorruptCheckpointError(f"{where} has no stored pieces")
    for p in pieces:
        _check_piece(p, shape, where)
    check_tiling(shape, [(p.offsets, p.sizes) for p in pieces], where)
    if math.prod(shape) == 0:
        return []
    pieces = [p for p in pieces if math.prod(p.sizes)]
    cuts = _intervals(shape, pieces)
    owner = _owner_of_cells(shape, pieces, cuts, where)
    split = [d for d, c in enumerate(cuts) if len(c) > 2]
    last = split[-1] if split else 0  # dims after it are whole in every piece
    runs = math.prod(shape[:last]) * (len(cuts[last]) - 1)
    if runs > MAX_SEGMENTS:
        raise UnsupportedCheckpointError(f"{where} is split into {runs:,} byte ranges, more than supported")
    return _merge(_runs(shape, pieces, cuts, owner, last))


def _runs(shape: tuple[int, ...], pieces: Sequence[Piece], cuts: list[list[int]], owner: dict[tuple[int, ...], int],
          last: int) -> list[Segment]:
    """One byte range per row of the dimensions before ``last`` and per cell along ``last``, row-major.

    Why not ``TensorRef.segment`` per range: a TP row-parallel weight is tens of thousands of ranges, and checking
    each piece's contiguity per range cost more than the rest of the plan (issue 24's benchmark). A piece is
    checked once (its whole extent); a range is its start plus the row's offset, which lies inside it. Along the
    innermost leading dimension, within one cell, each column of ranges starts at evenly spaced offsets (a
    ``range``), so a ``Segment`` per range is all the per-range work.
    """
    inner = math.prod(shape[last + 1:])
    whole = [p.data.segment() for p in pieces]  # contiguous and inside its storage, checked once per piece
    size = pieces[0].data.dtype.itemsize
    memo: dict[tuple[int, ...], list[tuple[str, int, tuple[tuple[int, int], ...], int]]] = {}

    def row_of(prefix: tuple[int, ...]) -> list[tuple[str, int, tuple[tuple[int, int], ...], int]]:
        row = memo.get(prefix)
        if row is None:  # per cell of the leading dimensions: each range's file, base and per-dimension strides
            row = memo[prefix] = [_run_of(pieces, whole, owner, cuts, prefix, j, last, inner, size)
                                  for j in range(len(cuts[last]) - 1)]
        return row

    if last == 0:
        return [Segment(path, base, nbytes) for path, base, _, nbytes in row_of(())]
    d_in = last - 1
    cell_of = [[bisect.bisect_right(cuts[d], i) - 1 for i in range(shape[d])] for d in range(d_in)]
    spans = list(enumerate(zip(cuts[d_in], cuts[d_in][1:])))
    out: list[Segment] = []
    for index in itertools.product(*(range(n) for n in shape[:d_in])):
        cells = tuple(cell_of[d][i] for d, i in enumerate(index))
        for c, (lo, hi) in spans:
            columns, starts = [], []
            for path, base, steps, nbytes in row_of(cells + (c,)):
                fixed = base + sum((i - o) * s for i, (o, s) in zip(index, steps))
                o_in, s_in = steps[d_in]
                columns.append((path, nbytes))
                starts.append(range(fixed + (lo - o_in) * s_in, fixed + (hi - o_in) * s_in, s_in))
            if len(columns) == 1:
                (path, nbytes), = columns
                out.extend([Segment(path, offset, nbytes) for offset in starts[0]])
            else:
                out.extend([Segment(path, offset, nbytes)
                            for offsets in zip(*starts) for (path, nbytes), offset in zip(columns, offsets)])
    return out


def _run_of(pieces: Sequence[Piece], whole: list[Segment], owner: dict[tuple[int, ...], int], cuts: list[list[int]],
            prefix: tuple[int, ...], j: int, last: int, inner: int, size: int,
            ) -> tuple[str, int, tuple[tuple[int, int], ...], int]:
    """The piece holding cell ``j`` along ``last`` of the cells ``prefix``: its file, the byte offset of the range
    at the piece's first row, ``(offset, byte stride)`` per leading dimension, and the range's length."""
    k = owner[prefix + (j,) + (0,) * (len(cuts) - last - 1)]
    p = pieces[k]
    strides = [math.prod(p.sizes[d + 1:last + 1]) * inner * size for d in range(last)]
    base = whole[k].offset + (cuts[last][j] - p.offsets[last]) * inner * size
    return (whole[k].path, base, tuple(zip(p.offsets[:last], strides)),
            (cuts[last][j + 1] - cuts[last][j]) * inner * size)


__all__ = ["MAX_SEGMENTS", "Piece", "assemble", "check_tiling"]
