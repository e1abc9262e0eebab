"""Value checks: what the stored bytes hold, read in one bounded streaming pass.

Checks: ``empty_tensors`` (no 0-element tensors, e.g. ZeRO-3 placeholders), ``tied_embeddings`` (a
tied output embedding that is stored anyway holds the input embedding's bytes) and ``values`` (no
NaN or Inf in any floating-point tensor).

An object-store output gets its ``values`` scan from :class:`StreamScan`, fed the bytes of each
safetensors file as they are uploaded, so validation does not download the weights again.

Decisions:
    * A tied ``lm_head.weight`` that is stored too is ignored by vLLM and transformers; when its bytes
      differ from the embedding it ties to, that is a warning (it may have been trained separately).
    * A square weight stored transposed has the right name, shape and dtype, so no check of the folder
      alone detects it. No cheap statistic (row versus column norms and the like) tells a random or
      trained square matrix from its transpose reliably, so none is used here; the comparison with
      the source does (:mod:`vllm_consolidate.validate.source`).
"""

from __future__ import annotations

import json
from typing import Any

from vllm_consolidate.dtypes import BY_SAFETENSORS, DType
from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.read.hf import StoredTensor
from vllm_consolidate.read.ranges import equal_bytes, iter_chunks
from vllm_consolidate.units import few
from vllm_consolidate.validate.context import Context
from vllm_consolidate.validate.report import FAIL, PASS, WARN, Check, skipped


def check_empty(ctx: Context) -> Check:
    """``empty_tensors``: no tensor has 0 elements (ZeRO-3 leaves such placeholders)."""
    empty = sorted(n for n, t in ctx.stored.tensors.items() if t.numel == 0)
    if empty:
        return Check("empty_tensors", FAIL,
                     f"{len(empty)} empty tensors (0 elements, e.g. ZeRO-3 placeholders): {few(empty)}",
                     {"names": empty})
    return Check("empty_tensors", PASS, "no empty tensors")


def check_tied(ctx: Context) -> Check:
    """``tied_embeddings``: a tied parameter that is stored too holds the bytes of the one it ties to."""
    if ctx.skeleton is None:
        return skipped("tied_embeddings", "no model skeleton" if ctx.tf else "transformers not installed")
    tied = ctx.skeleton.tied
    tensors = ctx.stored.tensors
    if not tied:
        return Check("tied_embeddings", PASS, "output embedding is not tied; it is stored separately")
    stored = sorted(n for n in tied if n in tensors)
    same = [n for n in stored if tied[n] in tensors and _same_bytes(tensors[n], tensors[tied[n]], ctx.chunk_bytes)]
    if stored and len(same) == len(stored):
        return Check("tied_embeddings", PASS,
                     f"tied: {few(stored)} is stored too, identical to {few({tied[n] for n in stored})}",
                     {"tied": tied})
    if stored:
        return Check("tied_embeddings", WARN,
                     f"the config ties {few(stored)} to {few({tied[n] for n in stored})} but it is stored "
                     "too; vLLM and transformers ignore the stored copy. If it was trained separately, set "
                     "tie_word_embeddings to false", {"tied": tied})
    return Check("tied_embeddings", PASS, f"tied: {few(tied)} uses {few(set(tied.values()))}", {"tied": tied})


def _same_bytes(a: StoredTensor, b: StoredTensor, chunk: int) -> bool:
    """Whether two stored tensors hold identical bytes (same dtype and shape), compared chunk by chunk."""
    if a.dtype != b.dtype or a.shape != b.shape or a.offset < 0 or b.offset < 0:
        return False
    if a.path == b.path and a.offset == b.offset:
        return True  # one storage saved under two names
    chunks = zip(iter_chunks(a.segments, chunk, buffer=bytearray(chunk)),
                 iter_chunks(b.segments, chunk, buffer=bytearray(chunk)))
    return all(equal_bytes(x, y) for x, y in chunks)


def check_values(ctx: Context) -> Check:
    """``values``: no NaN or Inf in any floating-point tensor, read once in chunks of ``ctx.chunk_bytes``."""
    if not ctx.scan_values:
        return skipped("values", "value scan turned off")
    bad: dict[str, dict[str, int]] = {}
    unscanned: list[str] = []
    scanned = 0
    buf = bytearray(ctx.chunk_bytes)  # one buffer for the whole scan: memory stays bounded
    for t in ctx.stored.tensors.values():
        if t.dtype is None or not t.dtype.is_floating_point or t.numel == 0:
            continue
        if t.offset < 0:
            unscanned.append(t.name)
            continue
        try:
            nan, inf = _scan(t, buf)
        except CorruptCheckpointError as exc:
            return Check("values", FAIL, f"{t.file}: {exc.message} (inside {t.name})")
        scanned += t.nbytes
        if nan or inf:
            bad[t.name] = {"nan": nan, "inf": inf}
    return values_check(bad, scanned, unscanned)


def _scan(t: StoredTensor, buf: bytearray) -> tuple[int, int]:
    """Count NaN and Inf in one tensor, read in chunks of (at most) ``len(buf)`` bytes."""
    import torch  # only here: importing torch costs seconds, and only the value scan needs it

    assert t.dtype is not None
    nan = inf = 0
    for chunk in iter_chunks(t.segments, len(buf) - len(buf) % t.dtype.itemsize, buffer=buf):
        n, i = _count(torch, chunk, t.dtype)
        nan, inf = nan + n, inf + i
    return nan, inf


def _count(torch: Any, chunk: Any, dtype: DType) -> tuple[int, int]:
    """NaN and Inf in ``chunk`` (a writable buffer holding whole elements of ``dtype``)."""
    values = torch.frombuffer(chunk, dtype=dtype.torch)
    if dtype.itemsize == 1 or dtype.is_complex:
        # torch has no isfinite/isinf for float8; float32 holds every float8 value exactly
        values = values.to(torch.complex64 if dtype.is_complex else torch.float32)
    if bool(torch.isfinite(values).all()):
        return 0, 0
    return int(torch.isnan(values).sum()), int(torch.isinf(values).sum())


def values_check(bad: dict[str, dict[str, int]], scanned: int, unscanned: list[str], how: str = "") -> Check:
    """The ``values`` check from NaN/Inf counts per tensor and the bytes scanned."""
    if bad:
        text = few((f"{n} ({bad[n]['nan']} NaN, {bad[n]['inf']} Inf)" for n in sorted(bad)), 3, sort=False)
        return Check("values", FAIL, f"{len(bad)} tensors hold NaN or Inf: {text}", {"tensors": bad})
    if unscanned:
        return Check("values", WARN, f"no NaN/Inf in {scanned / 1e6:.1f} MB; not scanned (non-contiguous): "
                     f"{few(unscanned)}")
    return Check("values", PASS, f"no NaN or Inf in {scanned / 1e6:.1f} MB of floating-point weights{how}")


class StreamScan:
    """The ``values`` scan of one safetensors file, fed its bytes in order as they are written.

    An object-store output is uploaded front to back; counting NaN and Inf on those bytes as they pass
    spares validation a second download of the whole model (it then reads back only headers and
    samples). Every floating-point tensor is counted exactly as :func:`check_values` counts it. The
    header is our own writer's, but still bounded. Memory: one scan buffer of :data:`STREAM_BUFFER`.
    Not thread-safe: the caller feeds one contiguous piece at a time (:class:`~vllm_consolidate.storage.
    upload.ObjectSink` does, under its upload lock).

    Attributes:
        file: The file's name, for messages.
        error: Why the scan could not be completed (then validation reads the file back instead).
    """

    STREAM_BUFFER = 16 * 2**20
    MAX_HEADER = 100 * 2**20  # safetensors' own limit

    def __init__(self, file: str):
        self.file = file
        self.bad: dict[str, dict[str, int]] = {}
        self.scanned = 0
        self.error: str | None = None
        self._pos = 0
        self._head = bytearray()
        self._spans: list[tuple[int, int, str, DType]] | None = None  # (start, end, name, dtype), in file order
        self._next = 0
        self._carry = b""  # the bytes of a split element
        self._buf = bytearray(self.STREAM_BUFFER)

    @property
    def complete(self) -> bool:
        """Whether the header and every floating-point tensor were seen, with no error."""
        return self.error is None and self._spans is not None and self._next == len(self._spans)

    def feed(self, data: Any) -> None:
        """Scan the next bytes of the file (never raises: a problem sets :attr:`error`)."""
        if self.error is not None:
            return
        view = memoryview(data).cast("B")
        try:
            if self._spans is None:
                view = self._header(view)
            if self._spans is not None and len(view):
                self._scan(view)
        except Exception as exc:  # noqa: BLE001 - the read-back scan is the fallback
            self.error = f"{type(exc).__name__}: {exc}"
        self._pos += len(view)

    def _header(self, view: memoryview) -> memoryview:
        """Take header bytes from ``view``; returns the rest (data bytes), once the header is whole."""
        need = 8 if len(self._head) < 8 else 8 + int.from_bytes(self._head[:8], "little")
        if need > 8 + self.MAX_HEADER:
            raise ValueError(f"header of {need} bytes")
        take = min(len(view), need - len(self._head))
        self._head += view[:take]
        self._pos += take
        view = view[take:]
        if len(self._head) == 8:
            return self._header(view) if len(view) else view
        if len(self._head) < need:
            return view
        spans = []
        for name, entry in json.loads(bytes(self._head[8:])).items():
            dtype = BY_SAFETENSORS.get(entry["dtype"]) if name != "__metadata__" else None
            start, end = entry["data_offsets"] if dtype is not None else (0, 0)
            if dtype is not None and dtype.is_floating_point and end > start:
                spans.append((need + start, need + end, name, dtype))
        self._spans = sorted(spans)
        return view

    def _scan(self, view: memoryview) -> None:
        import torch  # noqa: PLC0415 - only with a value scan (seconds to import)

        assert self._spans is not None
        pos, end = self._pos, self._pos + len(view)
        while self._next < len(self._spans) and self._spans[self._next][0] < end:
            start, stop, name, dtype = self._spans[self._next]
            lo, hi = max(start, pos), min(stop, end)
            if lo < hi:
                piece = view[lo - pos:hi - pos]
                self._count(torch, self._carry + piece if self._carry else piece, name, dtype)
            if stop > end:
                return
            self._next += 1

    def _count(self, torch: Any, piece: bytes | memoryview, name: str, dtype: DType) -> None:
        whole = len(piece) - len(piece) % dtype.itemsize
        self._carry = bytes(piece[whole:])
        for off in range(0, whole, self.STREAM_BUFFER):
            n = min(self.STREAM_BUFFER, whole - off)
            self._buf[:n] = piece[off:off + n]  # a writable copy: torch.frombuffer warns on read-only bytes
            nan, inf = _count(torch, memoryview(self._buf)[:n], dtype)
            self.scanned += n
            if nan or inf:
                counts = self.bad.setdefault(name, {"nan": 0, "inf": 0})
                counts["nan"] += nan
                counts["inf"] += inf

    @staticmethod
    def check(scans: list[StreamScan]) -> Check:
        """One ``values`` check from the scans of every weight file."""
        bad: dict[str, dict[str, int]] = {}
        for scan in scans:
            bad.update(scan.bad)
        return values_check(bad, sum(s.scanned for s in scans), [], " (scanned as uploaded)")


__all__ = ["StreamScan", "check_empty", "check_tied", "check_values", "values_check"]
