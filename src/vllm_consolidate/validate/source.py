"""Compare a model folder's tensors with the checkpoint they were made from.

Some broken folders look right from the folder alone. A square weight stored transposed has the right
name, shape and dtype. vLLM and transformers read the same wrong bytes, so they agree on the same
garbage. No statistic tells a square matrix from its transpose reliably: a random or trained matrix and
its transpose look alike. The checkpoint the folder was made from does tell. This module compares each
stored tensor with its source tensor, cast the same way the converter casts. Where they differ, it
checks whether the stored tensor is the source's transpose and says so by name.

Two depths:

* ``full`` (``vllm-consolidate validate DIR --against SOURCE``): every element of every tensor. This
  reads the folder and the source's tensor bytes once each.
* ``sample`` (after every conversion, on the output before it is published): the first, middle and last
  row of every tensor, and the whole of any tensor of up to :data:`SAMPLE_WHOLE_ELEMENTS` elements. A
  tensor written to the wrong place or transposed differs in its first row, unless the matrix is
  symmetric. The sample costs a few reads per tensor.

Both yield two checks: ``source_tensors`` (the folder holds exactly the names a conversion of the source
writes) and ``source_values`` (the bytes match).

Decision: a NaN matches any NaN. Its payload bits are not defined by the cast (see
:mod:`vllm_consolidate.casts`), and the ``values`` check fails on NaN anyway.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from vllm_consolidate import dtypes
from vllm_consolidate.casts import NAN_ABOVE, cast_into, nan_mask
from vllm_consolidate.errors import ConsolidateError
from vllm_consolidate.plan.inputs import InputSpec, open_input
from vllm_consolidate.plan.lora_rows import merged_rows, row_length
from vllm_consolidate.read.assets import read_config
from vllm_consolidate.read.hf import StoredTensor
from vllm_consolidate.read.ranges import equal_bytes, iter_chunks
from vllm_consolidate.source import TensorSpec, sub_segments
from vllm_consolidate.storage.streamed import NotKept
from vllm_consolidate.units import few
from vllm_consolidate.validate.context import Context, Reference  # Reference re-exported
from vllm_consolidate.validate.report import FAIL, PASS, WARN, Check

#: Tensors up to this many elements are compared whole even in ``sample`` mode.
SAMPLE_WHOLE_ELEMENTS = 1 << 16

#: Elements per sampled range of a 1-D tensor (a "row").
SAMPLE_VECTOR_ELEMENTS = 4096

#: Bytes read per step.
COMPARE_CHUNK_BYTES = 8 * 2**20

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def reference_for_folder(folder: str | Path, source: str | Path, *, input_type: str = "auto",
                         checkpoint_dir: str | Path | None = None, model_key: str | None = None,
                         base_model_name: str | None = None) -> Reference:
    """Read a source checkpoint's metadata and map it to the names a conversion writes into ``folder``.

    The folder's config.json decides tying, as it does in a conversion; its stored names decide the MoE
    expert layout expected (fused when it stores fused experts, else what ``--moe-layout auto`` writes).

    Args:
        folder: The converted model folder.
        source: Anything ``convert --input`` accepts (a DeepSpeed run or ``global_stepN`` folder,
            an HF Trainer ``checkpoint-N``, an HF folder, a single file).
        input_type: ``auto``, ``deepspeed``, ``dcp``, ``verl`` or ``hf_sharded``.
        checkpoint_dir: As ``convert --checkpoint-dir``.
        model_key: As ``convert --model-key`` (DCP sources).
        base_model_name: For a LoRA source, the base model (default: the adapter's own).

    Raises:
        ConsolidateError: The source cannot be read.
    """
    from vllm_consolidate.plan.moe import family_of, linearized_names
    from vllm_consolidate.plan.names import output_tensors

    spec = InputSpec(Path(source), input_type, Path(checkpoint_dir) if checkpoint_dir else None, model_key,
                     base_model_name, default_base=None)
    detected, model = open_input(spec)
    try:
        config = read_config(Path(folder) / "config.json")  # as convert and the config check read it
    except ConsolidateError:
        config = {}
    config = config if isinstance(config, dict) else {}
    tensors, dropped = output_tensors(model, config, _folder_moe_layout(folder))
    family = family_of(config)
    if family is not None and isinstance(config.get("quantization_config"), dict):
        tensors = linearized_names(tensors, family)  # as convert --quantize (and llm-compressor) name experts
    return Reference(str(detected.weights_dir), {t.name: t for t in tensors}, dropped)


def _folder_moe_layout(folder: str | Path) -> str:
    """``fused`` when the folder stores fused experts, else ``auto`` (read from its weight files' metadata)."""
    from vllm_consolidate.plan.moe import FUSED, layout_of
    from vllm_consolidate.read.hf import read_hf

    try:
        names = [t.name for t in read_hf(Path(folder)).tensors]
    except ConsolidateError:  # the file checks report an unreadable folder
        return "auto"
    return FUSED if layout_of(names) == FUSED else "auto"


def compare_with_reference(stored: dict[str, StoredTensor], ref: Reference,
                           chunk_bytes: int = COMPARE_CHUNK_BYTES) -> list[Check]:
    """The ``source_tensors`` and ``source_values`` checks of a folder's tensors against a reference.

    Args:
        stored: The folder's tensors by name, as the file checks located them.
        ref: What the folder should hold.
        chunk_bytes: Read size; memory is a few times this, plus the largest square tensor when one
            differs (to test whether it is transposed).
    """
    return [_names(stored, ref), _values(stored, ref, chunk_bytes)]


def check_source(ctx: Context) -> list[Check]:
    """``source_tensors`` and ``source_values`` of a validation run; none when it has no reference."""
    if ctx.reference is None:
        return []
    if ctx.quant is not None:  # --quantize: the quantized weights are compared dequantized, the rest as usual
        from vllm_consolidate.validate import quantized

        ref, weights = quantized.split_reference(ctx, ctx.reference)
        stored = {n: t for n, t in ctx.stored.tensors.items() if n not in ctx.quant.scales}
        return [*compare_with_reference(stored, ref), quantized.check_dequantized(ctx, weights, ref.depth)]
    return compare_with_reference(ctx.stored.tensors, ctx.reference)


def _names(stored: dict[str, StoredTensor], ref: Reference) -> Check:
    missing = sorted(set(ref.tensors) - set(stored))
    extra = sorted(set(stored) - set(ref.tensors) - set(ref.dropped))
    details = {"missing": missing, "extra": extra, "source": ref.label}
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} source tensors are not in the folder: {few(missing)}")
        if extra:
            parts.append(f"{len(extra)} stored tensors are not in the source: {few(extra)}")
        return Check("source_tensors", FAIL, "; ".join(parts), details)
    return Check("source_tensors", PASS, f"the folder holds the {len(ref.tensors)} tensors of {ref.label}", details)


def _values(stored: dict[str, StoredTensor], ref: Reference, chunk_bytes: int) -> Check:
    problems: dict[str, str] = {}
    transposed: list[str] = []
    skipped: list[str] = []
    compared = 0
    buffers = _Buffers(chunk_bytes)
    for name, spec in ref.tensors.items():
        t = stored.get(name)
        if t is None:
            continue  # reported by source_tensors
        if t.dtype is None or (t.numel and t.offset < 0):
            skipped.append(name)
            continue
        if t.shape != spec.shape:
            if len(t.shape) == 2 and t.shape == spec.shape[::-1] and _is_transpose(t, spec):
                transposed.append(name)
            else:
                problems[name] = f"has shape {list(t.shape)}, the source {list(spec.shape)}"
            continue
        first_diff, n_diff, n = _differences(t, spec, sample_ranges(t.shape, ref.depth), buffers)
        compared += n
        if n_diff == 0:
            continue
        if len(t.shape) == 2 and t.shape[0] == t.shape[1] > 1 and _is_transpose(t, spec):
            transposed.append(name)
        else:
            problems[name] = f"differs from the source in {n_diff} of {n} compared elements (first at element " \
                             f"{first_diff})"
    what = "every element" if ref.depth == "full" else "first, middle and last rows"
    details: dict[str, Any] = {"source": ref.label, "depth": ref.depth, "elements_compared": compared,
                               "transposed": transposed, "differ": problems, "not_compared": skipped}
    if transposed or problems:
        flipped = [f"{n} is stored transposed (it equals the source tensor's transpose)" for n in transposed]
        differ = [f"{n} {why}" for n, why in problems.items()]
        # Up to three of each kind first, so many transposed tensors do not hide a differing one.
        shown = flipped[:3] + differ[:3]
        return Check("source_values", FAIL, few(shown + flipped[3:] + differ[3:], len(shown), sort=False, sep="; ")
                     + f". The folder does not hold what {ref.label} holds: convert it again from the source",
                     details)
    if skipped:
        return Check("source_values", WARN, f"equal to the source ({what}); not compared (unreadable or "
                     f"non-contiguous): {few(skipped)}", details)
    return Check("source_values", PASS, f"{len(ref.tensors)} tensors equal the source ({what}, {compared:,} "
                 "elements compared)", details)


def sample_ranges(shape: tuple[int, ...], depth: str = "sample") -> list[tuple[int, int]]:
    """Element ranges ``(first, count)`` of a tensor to compare (known from the shape alone: an object-store
    output keeps exactly these from its upload for the validation)."""
    numel = math.prod(shape)
    if depth == "full" or numel <= SAMPLE_WHOLE_ELEMENTS:
        return [(0, numel)]
    row = math.prod(shape[1:]) if len(shape) >= 2 else SAMPLE_VECTOR_ELEMENTS
    rows = math.ceil(numel / row)
    return [(r * row, min(row, numel - r * row)) for r in sorted({0, rows // 2, rows - 1})]


class _Buffers:
    """Three read buffers of ``chunk_bytes``, reused for every tensor of a comparison."""

    def __init__(self, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self.got, self.src, self.want = (bytearray(chunk_bytes) for _ in range(3))


def _elements(spec: TensorSpec | StoredTensor, first: int, count: int, step: int, buffer: bytearray) -> Any:
    """Bytes of ``count`` elements from ``first``, ``step`` elements at a time (each valid until the next)."""
    size = spec.dtype.itemsize
    return iter_chunks(list(sub_segments(spec.segments, first * size, count * size)), step * size, buffer=buffer)


def _source_elements(spec: TensorSpec, first: int, count: int, step: int, buffer: bytearray) -> Any:
    """As :func:`_elements`; for a LoRA-merged weight, the merged rows in float32 (``first``, ``count``
    and ``step`` are whole rows: see :func:`_differences`)."""
    if spec.delta is None:
        yield from _elements(spec, first, count, step, buffer)
        return
    cols = row_length(spec)
    row = first // cols
    for chunk in _elements(spec, first, count, step, buffer):
        rows = len(chunk) // spec.dtype.itemsize // cols
        yield merged_rows(spec, row, rows, chunk)
        row += rows


def _differences(t: StoredTensor, spec: TensorSpec, ranges: list[tuple[int, int]],
                 buffers: _Buffers) -> tuple[int, int, int]:
    """``(first differing element, differing elements, elements compared)`` over ``ranges``.

    A LoRA-merged weight is compared with the merge of its source rows (the writer's arithmetic, so
    this checks what was written where; ``tests/test_lora.py`` checks the arithmetic against peft).
    """
    out_dtype, src_dtype = t.dtype, dtypes.float32 if spec.delta is not None else spec.dtype
    step = max(1, buffers.chunk_bytes // max(out_dtype.itemsize, src_dtype.itemsize))
    if spec.delta is not None:  # whole rows (the sampled ranges are whole rows too)
        cols = row_length(spec)
        step = max(1, step // cols) * cols
        ranges = [(f // cols * cols, -(-(f + c) // cols) * cols - f // cols * cols) for f, c in ranges]
    first_diff, n_diff, n = -1, 0, 0
    for first, count in ranges:
        pos = first
        for got, src in zip(_elements(t, first, count, step, buffers.got),
                            _source_elements(spec, first, count, step, buffers.src)):
            k = len(got) // out_dtype.itemsize
            if src_dtype == out_dtype:
                want = src
            else:
                want = memoryview(buffers.want)[: len(got)]
                cast_into(src, src_dtype, out_dtype, want)
            if not equal_bytes(got, want):
                diff = _differing(got, want, out_dtype)
                if diff.size:
                    first_diff = int(pos + diff[0]) if first_diff < 0 else first_diff
                    n_diff += int(diff.size)
            pos += k
            n += k
    return first_diff, n_diff, n


def _differing(got: memoryview, want: memoryview, dtype: Any) -> Any:
    """Indices of elements whose bits differ, not counting NaN against NaN."""
    bits = _UINT.get(dtype.itemsize, np.uint8)
    a, b = np.frombuffer(got, dtype=bits), np.frombuffer(want, dtype=bits)
    mask = a != b
    if dtype in NAN_ABOVE and mask.any():
        mask &= ~(nan_mask(a, dtype) & nan_mask(b, dtype))
    return np.flatnonzero(mask)


def _whole(spec: TensorSpec | StoredTensor, dtype: Any) -> Any:
    """A 2-D tensor's bits as an array of unsigned integers of ``dtype``'s size, cast to ``dtype`` first."""
    raw = bytearray(spec.numel * spec.dtype.itemsize)
    data = next(iter_chunks(spec.segments, max(len(raw), 1), buffer=raw), memoryview(raw))  # one read, whole
    if spec.dtype != dtype:
        out = bytearray(spec.numel * dtype.itemsize)
        cast_into(data, spec.dtype, dtype, memoryview(out))
        data = memoryview(out)
    return np.frombuffer(data, dtype=_UINT[dtype.itemsize]).reshape(spec.shape)


def _is_transpose(t: StoredTensor, spec: TensorSpec) -> bool:
    """Whether a stored 2-D tensor holds exactly the source tensor's transpose (reads both whole).

    False when the stored tensor cannot be read whole: an object-store output validated before its commit keeps
    only the sampled ranges (:mod:`vllm_consolidate.storage.streamed`); the difference is reported as such.
    """
    if t.dtype is None or t.dtype.itemsize not in _UINT or len(spec.shape) != 2:
        return False
    try:
        stored = _whole(t, t.dtype)
    except NotKept:
        return False
    return bool(np.array_equal(stored, _whole(spec, t.dtype).T))
