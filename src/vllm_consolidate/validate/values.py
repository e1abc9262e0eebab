"""Value checks: what the stored bytes hold, read in one bounded streaming pass.

Checks: ``empty_tensors`` (no 0-element tensors, e.g. ZeRO-3 placeholders), ``tied_embeddings`` (a
tied output embedding that is stored anyway holds the input embedding's bytes) and ``values`` (no
NaN or Inf in any floating-point tensor).

Decisions:
    * A tied ``lm_head.weight`` that is stored too is ignored by vLLM and transformers; when its bytes
      differ from the embedding it ties to, that is a warning (it may have been trained separately).
    * A square weight stored transposed has the right name, shape and dtype, so no check of the folder
      alone detects it. No cheap statistic (row versus column norms and the like) tells a random or
      trained square matrix from its transpose reliably, so none is used here; the comparison with
      the source does (:mod:`vllm_consolidate.validate.source`).
"""

from __future__ import annotations

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
    if bad:
        text = few((f"{n} ({bad[n]['nan']} NaN, {bad[n]['inf']} Inf)" for n in sorted(bad)), 3, sort=False)
        return Check("values", FAIL, f"{len(bad)} tensors hold NaN or Inf: {text}", {"tensors": bad})
    if unscanned:
        return Check("values", WARN, f"no NaN/Inf in {scanned / 1e6:.1f} MB; not scanned (non-contiguous): "
                     f"{few(unscanned)}")
    return Check("values", PASS, f"no NaN or Inf in {scanned / 1e6:.1f} MB of floating-point weights")


def _scan(t: StoredTensor, buf: bytearray) -> tuple[int, int]:
    """Count NaN and Inf in one tensor, read in chunks of (at most) ``len(buf)`` bytes."""
    import torch  # only here: importing torch costs seconds, and only the value scan needs it

    assert t.dtype is not None
    nan = inf = 0
    for chunk in iter_chunks(t.segments, len(buf) - len(buf) % t.dtype.itemsize, buffer=buf):
        values = torch.frombuffer(chunk, dtype=t.dtype.torch)
        if t.dtype.itemsize == 1 or t.dtype.is_complex:
            # torch has no isfinite/isinf for float8; float32 holds every float8 value exactly
            values = values.to(torch.complex64 if t.dtype.is_complex else torch.float32)
        if not bool(torch.isfinite(values).all()):
            nan += int(torch.isnan(values).sum())
            inf += int(torch.isinf(values).sum())
    return nan, inf


__all__ = ["check_empty", "check_tied", "check_values"]
