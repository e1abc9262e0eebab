"""Bounds on the numbers a checkpoint's metadata may declare, shared by every reader.

A header or a pickle can declare any shape. Where a tensor has bytes, its element count is checked
against them, which bounds the shape; but an empty tensor (one dim 0) has no bytes, so a shape such
as ``[10**12, 0, 128]`` passes every byte check while a later loop over its first dim (one per MoE
expert) would run ``10**12`` times. The bounds below are far above any real tensor and far below
what a loop or an allocation can survive:

* :data:`MAX_DIM` (2**32): one dimension. The largest real dims are vocabularies (~2.6e5) and, for
  1-D flat buffers, a few times 1e9 elements at most.
* :data:`MAX_NDIM` (64): rank. Real weights have at most 5 dims.
* an empty tensor's non-zero dims, multiplied, are also at most :data:`MAX_DIM`: nothing on disk
  bounds them, and a real empty tensor is a ``[0]`` ZeRO-3 placeholder or a zero-width layer.

Numbers must be real ``int`` s: a bool (a subclass of int in Python), a float such as ``2.0`` or a
string is refused, as the safetensors library itself refuses them.
"""

from __future__ import annotations

import math
import os
from typing import Any

from vllm_consolidate.errors import CorruptCheckpointError

MAX_DIM = 2**32
MAX_NDIM = 64


def _reads_as_another_type(text: str) -> bool:
    """Whether a string, printed bare, would pass for a number, a constant or nothing (``2``, ``nan``, ``true``)."""
    if not text or text != text.strip() or text.lower() in ("true", "false", "none", "null"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def brief(value: Any, limit: int = 80) -> str:
    """A short, printable description of a value from untrusted metadata.

    Never the repr of a container: a pickle can build a list that holds itself, or a small list
    whose repr is exponential through shared sub-lists. Shapes (lists of a few ints) are shown. A
    string is quoted when it would otherwise pass for something else: ``world_size '2'`` (a string
    where a number belongs) must not read as ``world_size 2``.
    """
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        # str() of an int over 4300 digits raises, and is slow well before that.
        return str(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        if value.isprintable() and not _reads_as_another_type(value[:limit]):  # a plain name reads best unquoted
            return value if len(value) <= limit else value[: limit - 3] + "..."
        text = repr(value[:limit])  # escaped: control characters from a file never reach the terminal raw
        return text if len(text) <= limit else text[: limit - 3] + "..."
    if isinstance(value, bytes):
        text = repr(value[:limit])
        return text if len(text) <= limit else text[: limit - 3] + "..."
    if type(value) in (list, tuple) and len(value) <= MAX_NDIM and all(
            type(v) is int and v.bit_length() <= 64 for v in value):
        text = repr(list(value))
        return text if len(text) <= limit else text[: limit - 3] + "..."
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return f"a {type(value).__name__}"


def is_int(value: Any) -> bool:
    """True for a plain ``int`` (not a bool, float or numpy scalar)."""
    return type(value) is int


def checked_shape(value: Any, *, what: str, path: str | os.PathLike | None) -> tuple[int, ...]:
    """``value`` as a shape, if it is a list or tuple of at most :data:`MAX_NDIM` ints in ``[0, MAX_DIM]``.

    Args:
        value: The declared shape (JSON list or pickled tuple / ``torch.Size``).
        what: The tensor, for the message (``"tensor model.norm.weight"``).
        path: The file that declares it.

    Raises:
        CorruptCheckpointError: Not a list of non-negative ints, too many dims, or a dim too large.
    """
    if not isinstance(value, (list, tuple)):
        raise CorruptCheckpointError(f"{what}: shape {brief(value)} is not a list of integers", path=path)
    if len(value) > MAX_NDIM:
        raise CorruptCheckpointError(f"{what}: shape has {len(value)} dimensions, more than {MAX_NDIM}", path=path)
    for dim in value:
        if not is_int(dim):
            raise CorruptCheckpointError(
                f"{what}: shape {brief(list(value))} holds {brief(dim, 40)} ({type(dim).__name__}), not an integer",
                path=path)
        if dim < 0 or dim > MAX_DIM:
            raise CorruptCheckpointError(
                f"{what}: shape {brief(list(value))} has the dimension {brief(dim)}, outside [0, {MAX_DIM}]", path=path)
    shape = tuple(value)
    if 0 in shape and math.prod(d for d in shape if d) > MAX_DIM:
        raise CorruptCheckpointError(
            f"{what}: empty tensor with shape {brief(list(shape))}; its other dimensions are implausibly large",
            path=path)
    return shape


def checked_count(value: Any, *, what: str, path: str | os.PathLike | None, low: int = 0,
                  high: int | None = None) -> int:
    """``value`` if it is a plain int in ``[low, high]``.

    Raises:
        CorruptCheckpointError: Not an int, or out of range.
    """
    if not is_int(value):
        raise CorruptCheckpointError(f"{what} is {brief(value)} ({type(value).__name__}), not an integer", path=path)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise CorruptCheckpointError(f"{what} is {brief(value)}, outside {bound}", path=path)
    return value


__all__ = ["MAX_DIM", "MAX_NDIM", "brief", "checked_count", "checked_shape", "is_int"]
