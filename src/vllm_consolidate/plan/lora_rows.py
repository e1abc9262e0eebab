"""The merged rows of a LoRA weight, computed where the writer and validation need them.

Arithmetic. The same torch operations as peft's ``merge_and_unload`` on a float32 model
(``get_delta_weight``: ``transpose(B @ A, fan_in_fan_out) * scaling``, then ``weight += delta``), on
the float32 masters. The product's bits depend on the shape of the matrix product that computes them:
BLAS picks its kernel by size, and rows computed in a small product differ from the same rows of a
large one (MKL 2024 on AVX2: a product of 1, 2, 3, 5, 6 or 7 rows differs from a 1001-row one, in
the last bit of about one element in ten; a product of 16 rows or more agrees). So the update is
computed in fixed tiles, never in the rows a caller asks for: the tiles of a tensor are rows
``[k*T, k*T + T)`` (the last one moved back to end at the last row), each computed in one product of
``T`` rows (:func:`tile_rows`; the whole tensor when it fits in :data:`TILE_BYTES`, which is then
exactly peft's product). The writer's blocks and the validator's sampled rows are cut from the same
tiles, so they always agree, and ``tests/test_lora.py`` checks the result against peft. Tiles are
cached (a few, by :data:`TILE_CACHE`), so consecutive blocks of one tile cost one product.
With a 16-bit base the base rows are widened to float32 first and the sum is rounded once to the
output dtype; peft instead rounds the delta to the base dtype and adds in 16 bits, which loses more.
"""


from __future__ import annotations

import threading
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.casts import cast_into
from vllm_consolidate.read.ranges import iter_chunks
from vllm_consolidate.source import Delta, TensorSpec

_FACTORS: dict[int, tuple[Delta, Any, Any]] = {}
_TILES: dict[tuple[int, int], tuple[Delta, Any]] = {}
_LOCK = threading.Lock()
#: Factor pairs kept in memory at once (each is a few MB even for a 70B model's widest layer).
_CACHE = 8
#: Largest tile of a merged weight's float32 update computed in one product (see the module docstring).
TILE_BYTES = 8 * 2**20
#: Tiles kept in memory at once: one per writer thread, and one more.
TILE_CACHE = 3


def _read_fp32(spec: TensorSpec) -> Any:
    import torch

    raw = bytearray(spec.nbytes)
    data = next(iter_chunks(spec.segments, max(len(raw), 1), buffer=raw), memoryview(raw))
    if spec.dtype != dtypes.float32:
        out = bytearray(spec.numel * 4)
        cast_into(data, spec.dtype, dtypes.float32, memoryview(out))
        raw = out
    return torch.frombuffer(raw, dtype=torch.float32).reshape(spec.shape)


def _factors(delta: Delta) -> tuple[Any, Any]:
    # Keyed by identity, and the entry holds the Delta itself, so its id cannot be reused while cached.
    key = id(delta)
    with _LOCK:
        entry = _FACTORS.get(key)
        if entry is not None and entry[0] is delta:
            return entry[1], entry[2]
    a, b = _read_fp32(delta.a), _read_fp32(delta.b)
    with _LOCK:
        if len(_FACTORS) >= _CACHE:
            _FACTORS.pop(next(iter(_FACTORS)))
        _FACTORS[key] = (delta, a, b)
    return a, b


def row_length(spec: TensorSpec) -> int:
    """Elements per row of a merged weight (blocks of whole rows are merged)."""
    return spec.numel // spec.shape[0] if spec.shape and spec.shape[0] else 1


def tile_rows(spec: TensorSpec) -> int:
    """Rows per tile of a merged weight's update: all of them when it fits in :data:`TILE_BYTES`, else a
    multiple of 64 (never fewer than 64: small products take other BLAS kernels, see the module docstring)."""
    total = spec.shape[0] if spec.shape else 1
    fit = TILE_BYTES // (4 * row_length(spec))
    return total if fit >= total else min(total, max(64, fit // 64 * 64))


def _tile(delta: Delta, start: int, rows: int) -> Any:
    """``(B @ A) * scale`` for weight rows ``[start, start + rows)``, in one product (cached)."""
    key = (id(delta), start)
    with _LOCK:
        entry = _TILES.get(key)
        if entry is not None and entry[0] is delta:
            return entry[1]
    a, b = _factors(delta)
    if delta.transpose:  # rows of the weight are columns of A (embeddings, Conv1D)
        update = (b @ a[:, start:start + rows]).T * delta.scale
    else:
        update = (b[start:start + rows] @ a) * delta.scale
    with _LOCK:
        while len(_TILES) >= TILE_CACHE:
            _TILES.pop(next(iter(_TILES)))
        _TILES[key] = (delta, update)
    return update


def merged_rows(spec: TensorSpec, first_row: int, rows: int, base: memoryview) -> memoryview:
    """Rows ``[first_row, first_row + rows)`` of the merged weight, as float32 bytes.

    Any block of rows gives the same bits for a row: they are cut from the fixed tiles of
    :func:`tile_rows`, whatever the block.

    Args:
        spec: A tensor with a :class:`~vllm_consolidate.source.Delta`.
        first_row: The first row.
        rows: How many rows.
        base: Those rows of the base weight, in ``spec.dtype``.
    """
    import torch

    delta = spec.delta
    assert delta is not None
    cols, total, size = row_length(spec), spec.shape[0], tile_rows(spec)
    # A copy even from float32: the tiles are added in place, and ``base`` is the caller's buffer.
    weight = torch.frombuffer(base, dtype=spec.dtype.torch, count=rows * cols).reshape(rows, cols)
    weight = weight.to(torch.float32, copy=True)
    row = first_row
    while row < first_row + rows:
        start = min(row // size * size, total - size)  # the last tile ends at the last row
        end = min(start + size, first_row + rows)
        weight[row - first_row:end - first_row] += _tile(delta, start, size)[row - start:end - start]
        row = end
    return memoryview(weight.contiguous().numpy()).cast("B")


__all__ = ["TILE_BYTES", "TILE_CACHE", "merged_rows", "row_length", "tile_rows"]
