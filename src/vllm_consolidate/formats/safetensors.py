"""The safetensors header: read strictly (as the safetensors library does, and then some) and written.

A safetensors file is an 8-byte little-endian header length, a JSON header, and a data section.
A tensor is described from the header alone; its bytes are ``8 + header_len + data_offsets``.

Everything ``safetensors.safe_open`` (Rust ``Metadata::validate``, safetensors 0.8) refuses is
refused here, each as a :class:`CorruptCheckpointError` naming the file and, where there is one, the
tensor:

* a header that is not UTF-8, not a JSON object, or longer than :data:`MAX_HEADER_BYTES`;
* a shape or offset that is not a list of non-negative integers (a float such as ``2.0``, a bool, a
  string, ``-2``, or ``1e400``), or ``data_offsets`` that are not exactly two of them;
* ``__metadata__`` that is not null or a ``{str: str}`` object;
* byte ranges that, sorted, do not tile the data section exactly: the first must start at 0, each
  must start where the previous ended (a gap or an overlap is refused) and the last must end at the
  end of the file (trailing bytes are refused);
* a range whose length is not ``numel * itemsize``.

Stricter than the library, because two readers must never see two models in one file: a key that
appears twice in any object (the library keeps one of the two silently), a string that holds an
escaped lone surrogate, and the shape bounds of :mod:`.limits`. Unknown keys inside a tensor entry
are ignored, as the library ignores them.

Header cap (:data:`MAX_HEADER_BYTES`, 16 MiB; the library allows 100 MB). Measured on the 2-core
test machine, CPython 3.11, ``json.loads`` with the duplicate-key hook:

* realistic: 118k tensor entries with long MoE names (``model.layers.N.mlp.experts.E.down_proj.
  weight_scale_inv``, a 2-D shape, 12-digit offsets) fill 16 MiB; :func:`stored_safetensors`
  reads them in 1.3-2.8 s with 132 MiB of peak growth. Real files hold a few thousand tensors (a
  5 GB shard); even a whole DeepSeek-V3 in one file (~91k tensors) would fit.
* hostile: the costliest JSON per byte found is one tiny container per 3-4 bytes
  (``[[0],[0],...]``, ``[{},{},...]``): ``json.loads`` grows by 24-26x its input, so 16 MiB costs
  ~420 MiB (the whole CLI peaks at 480 MiB and 4-5 s before refusing it), while the 85 MB the
  library accepts would cost ~2.2 GiB. Unique short strings or keys cost 12-22x.

So 16 MiB bounds a hostile header to about half a GiB and a few seconds, with headroom over the
largest single-file model we know of.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.limits import brief, checked_count, checked_shape
from vllm_consolidate.safe_io import MIB, open_source, parse_json
from vllm_consolidate.source import Segment

MAX_HEADER_BYTES = 16 * MIB
#: Largest offset the library can represent (its offsets are ``usize``).
_MAX_OFFSET = 2**64 - 1

#: safetensors dtype strings (as in the safetensors spec) -> torch dtypes: the inverse of the planner's table.
SAFETENSORS_TO_TORCH: dict[str, DType] = dict(dtypes.BY_SAFETENSORS)


@dataclass
class StoredTensor:
    """A tensor as a weight file stores it, located but not read.

    Attributes:
        name: Its key in the file.
        file: The file name.
        dtype: The torch dtype, or None for a dtype this tool cannot read.
        dtype_code: The dtype as the file spells it (``F32``, ``torch.float32``).
        shape: Its shape.
        path: The file's path.
        offset: Absolute offset of its first byte, or -1 when it is not one contiguous range.
        nbytes: Its size in bytes.
    """

    name: str
    file: str
    dtype: DType | None
    dtype_code: str
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def segments(self) -> list[Segment]:
        """Its bytes as one segment; none when it is empty or not one contiguous range."""
        return [Segment(self.path, self.offset, self.nbytes)] if self.nbytes and self.offset >= 0 else []


def _read_raw_header(path: str) -> tuple[bytes, int]:
    """The header bytes and the file's size, read from a regular file without following its header length blindly."""
    src = open_source(path)  # a FIFO named *.safetensors is refused here instead of blocking
    try:
        size = src.size
        head = src.pread(8, 0)
        if len(head) != 8:
            raise CorruptCheckpointError("file is shorter than a safetensors header; it is truncated", path=path)
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER_BYTES:
            raise CorruptCheckpointError(
                f"safetensors header length is {hlen:,} bytes, more than the {MAX_HEADER_BYTES:,} a real header "
                "needs; refusing to parse it", path=path)
        if 8 + hlen > size:
            raise CorruptCheckpointError(
                f"safetensors header length {hlen} does not fit the {size}-byte file; it is truncated or "
                "not a safetensors file", path=path)
        chunks, got = [], 0
        while got < hlen:
            data = src.pread(min(hlen - got, 4 * MIB), 8 + got)
            if not data:
                raise CorruptCheckpointError("file ended inside its safetensors header; it is truncated", path=path)
            chunks.append(data)
            got += len(data)
        return b"".join(chunks), size
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read file: {exc.strerror or exc}", path=path) from exc
    finally:
        src.close()


def _check_text(text: str, what: str, path: str) -> None:
    # json.loads turns "\ud800" into a lone surrogate, which is no UTF-8 text (the library refuses it).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CorruptCheckpointError(f"{what} {brief(text)} holds an escaped lone surrogate, not UTF-8 text",
                                     path=path) from None


def _check_metadata(meta: Any, path: str) -> None:
    if meta is None:  # the library accepts null
        return
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"safetensors __metadata__ is {brief(meta)}, not an object of strings",
                                     path=path)
    for key, value in meta.items():
        if not isinstance(value, str):
            raise CorruptCheckpointError(
                f"safetensors __metadata__ entry {brief(key)} is {brief(value)}, not a string", path=path)
        _check_text(key, "__metadata__ key", path)
        _check_text(value, f"__metadata__ entry {brief(key)}", path)


def _entry(name: str, meta: Any, path: str) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype code, shape, begin, end)`` of one header entry, each of the right type and range."""
    _check_text(name, "tensor name", path)
    what = f"tensor {brief(name)}"
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{what}: header entry is {brief(meta)}, not an object", path=path)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in meta:
            raise CorruptCheckpointError(f"{what}: header entry has no '{key}'", path=path)
    code = meta["dtype"]
    if not isinstance(code, str):
        raise CorruptCheckpointError(f"{what}: dtype {brief(code)} is not a string", path=path)
    shape = checked_shape(meta["shape"], what=what, path=path)
    offsets = meta["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise CorruptCheckpointError(f"{what}: data_offsets {brief(offsets)} is not a pair of integers", path=path)
    begin, end = (checked_count(v, what=f"{what}: data offset", path=path, high=_MAX_OFFSET) for v in offsets)
    return code, shape, begin, end


def _check_tiling(ranges: list[tuple[int, int, str]], data_size: int, path: str) -> None:
    """The sorted byte ranges must cover ``[0, data_size)`` exactly once, as the library requires."""
    pos, prev = 0, None
    for begin, end, name in sorted(ranges):
        if begin != pos:
            how = (f"overlaps {brief(prev)}, which ends at {pos}" if begin < pos and prev is not None
                   else f"leaves a gap of {begin - pos} bytes after " + (brief(prev) if prev else "the header"))
            raise CorruptCheckpointError(
                f"tensor {brief(name)}: data_offsets [{begin}, {end}) {how}; the header is damaged or forged",
                path=path)
        pos, prev = end, name
    if pos != data_size:
        how = (f"{data_size - pos} bytes follow the last tensor" if pos < data_size
               else f"the tensors need {pos} bytes; the file is truncated")
        raise CorruptCheckpointError(f"the data section holds {data_size} bytes but {how}", path=path)


def stored_safetensors(path: str | os.PathLike) -> list[StoredTensor]:
    """Every tensor of a safetensors file, in header order, from the header alone.

    A dtype code not in :data:`SAFETENSORS_TO_TORCH` gives ``dtype=None`` (its byte range is still
    checked against the file); the caller decides whether that is an error.

    Raises:
        CorruptCheckpointError: The file is not a regular file, or its header is truncated, malformed,
            ambiguous, too large, or does not tile the data section (see the module docstring).
    """
    spath = os.fspath(path)
    raw, size = _read_raw_header(spath)
    data_start = 8 + len(raw)
    header = parse_json(raw, path=spath, what="safetensors header", unique_keys=True)
    del raw
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"safetensors header is {brief(header)}, not a JSON object", path=spath)
    out: list[StoredTensor] = []
    ranges: list[tuple[int, int, str]] = []
    name_of_file = Path(spath).name
    for name, meta in header.items():
        if name == "__metadata__":
            _check_metadata(meta, spath)
            continue
        code, shape, begin, end = _entry(name, meta, spath)
        dtype = SAFETENSORS_TO_TORCH.get(code)
        nbytes = end - begin if dtype is None else math.prod(shape) * dtype.itemsize
        if end < begin:
            raise CorruptCheckpointError(
                f"tensor {brief(name)}: data_offsets [{begin}, {end}) end before they begin", path=spath)
        if end - begin != nbytes:
            raise CorruptCheckpointError(
                f"tensor {brief(name)}: data_offsets [{begin}, {end}) hold {end - begin} bytes, but shape "
                f"{list(shape)} of {brief(code)} needs {nbytes}; the header is damaged or forged", path=spath)
        ranges.append((begin, end, name))
        out.append(StoredTensor(name, name_of_file, dtype, code, shape, spath, data_start + begin, nbytes))
    _check_tiling(ranges, size - data_start, spath)
    return out


# -- writing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor's line in a header we write: its name, dtype, shape and data offsets."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int


def header_bytes(entries: list[HeaderEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file, as ``safetensors.torch.save_file`` writes it.

    Compact JSON, ``__metadata__`` first (``{"format": "pt"}`` by default), then the tensors in the
    given order, padded with spaces to a multiple of 8 bytes (the spec's alignment advice).
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    for e in entries:
        header[e.name] = {"dtype": e.dtype.safetensors, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


__all__ = ["MAX_HEADER_BYTES", "SAFETENSORS_TO_TORCH", "HeaderEntry", "StoredTensor", "header_bytes",
           "stored_safetensors"]
