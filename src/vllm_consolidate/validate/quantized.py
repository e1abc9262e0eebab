"""Quantized folders (``convert --quantize``): the compressed-tensors layout against the config and the source.

Checks:

* ``quantization_config`` (in place of "must be absent"): config.json's entry is, field for field, one of the
  schemes of :mod:`vllm_consolidate.plan.quantize` (as llm-compressor writes it), whatever its ``ignore`` list;
  any other quantization_config still fails (a consolidated checkpoint is dequantized);
* ``quantized_weights``: every Linear module of the meta model that ``ignore`` does not name stores an
  ``int8``/``float8_e4m3fn`` ``weight`` and a ``weight_scale`` of the scheme's shape in the config's dtype; no
  other tensor is quantized or has a scale. The skeleton checks then run without the scales;
* ``source_quantized`` (with a reference): the sampled rows (all of them with ``--against``), dequantized
  (``q * scale``, as compressed-tensors does), are within the scheme's rounding bound of the source rows cast
  to the working dtype; a weight written to the wrong place, transposed or with a wrong scale is far outside.

Decision: the bound is the rounding of a correct quantization plus slack for the working dtype, not a
tolerance to tune: per element ``|dq - w| <= s * (0.5 + 2**-7 * |w / s|) + 2**-7 * |w|`` for INT8 (round to
an integer after ``w / s`` was rounded to bf16) and ``|dq - w| <= 2**-3 * |w| + s * 2**-9`` for FP8 E4M3 (3
mantissa bits; subnormals step by ``2**-9``). Bit equality with llm-compressor is the tests' business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.errors import ConsolidateError
from vllm_consolidate.plan import vlm
from vllm_consolidate.plan.moe import LINEARIZED_LEAVES, expert_leaf_renamed, family_of
from vllm_consolidate.plan.quantize import SCHEMES, Scheme, linear_modules
from vllm_consolidate.read.ranges import iter_chunks
from vllm_consolidate.source import TensorSpec, sub_segments
from vllm_consolidate.units import few
from vllm_consolidate.validate.context import Context, Reference
from vllm_consolidate.validate.report import FAIL, PASS, Check, skipped

SCALE_SUFFIX = "_scale"


@dataclass
class Layout:
    """A recognised quantized folder: its scheme, its ignore list and (after the layout check) its weights."""

    scheme: Scheme
    ignore: list[str]
    scales: dict[str, str] = field(default_factory=dict)  # quantized weight -> its scale


def recognise(qc: Any) -> Layout | None:
    """The layout of a ``quantization_config`` we write, else None."""
    if not isinstance(qc, dict) or not isinstance(qc.get("ignore"), list):
        return None
    for scheme in SCHEMES.values():
        if qc == scheme.quantization_config(qc["ignore"]):
            return Layout(scheme, [str(i) for i in qc["ignore"]])
    return None


def check_quantization_config(ctx: Context) -> Check | None:
    """``quantization_config`` of a folder whose config is one of our schemes (sets ``ctx.quant``), else None."""
    layout = recognise((ctx.config or {}).get("quantization_config"))
    if layout is None:
        return None
    ctx.quant = layout
    return Check("quantization_config", PASS,
                 f"compressed-tensors {layout.scheme.name} (llm-compressor's {layout.scheme.preset}); "
                 f"{len(layout.ignore)} Linear modules left unquantized: {few(layout.ignore)}")


def check_layout(ctx: Context) -> list[Check]:
    """``quantized_weights``: the quantized weights and scales against the config (see the module docstring)."""
    layout: Layout | None = getattr(ctx, "quant", None)
    if layout is None:
        return []
    if ctx.tf is None:  # the Linear modules come from the model transformers builds
        return [skipped("quantized_weights", "transformers not installed")]
    stored = ctx.stored.tensors
    scheme = layout.scheme
    problems: list[str] = []
    try:
        quantized, _ = linear_modules(ctx.config or {}, tuple(layout.ignore))
    except ConsolidateError as exc:
        return [Check("quantized_weights", FAIL, f"cannot list the model's Linear modules: {exc.message}")]
    work = _config_dtype(ctx)
    for module in quantized:
        weight = f"{module}.weight"
        if weight not in stored:  # a vision-language model's training names, written under others (plan/vlm.py)
            weight = vlm.written_name(ctx.config or {}, weight)
        scale = f"{weight}{SCALE_SUFFIX}"
        w, s = stored.get(weight), stored.get(scale)
        if w is None:
            continue  # missing_tensors reports it
        if w.dtype != scheme.qdtype or s is None:
            problems.append(f"{weight} is {w.dtype} " + ("without" if s is None else "with") + f" a {scale}; "
                            f"{scheme.name} stores it as {scheme.qdtype} with one")
            continue
        want = scheme.scale_shape(w.shape) if len(w.shape) == 2 else None
        if s.shape != want or (work is not None and s.dtype != work):
            problems.append(f"{scale} is {s.dtype} {list(s.shape)}; {scheme.name} needs {work} {list(want or ())}")
            continue
        layout.scales[weight] = scale
    extra = sorted(n for n, t in stored.items()
                   if (n.endswith(SCALE_SUFFIX) or t.dtype == scheme.qdtype)
                   and n not in layout.scales and n not in layout.scales.values())
    if extra:
        problems.append(f"{len(extra)} tensors are quantized or scales of modules the config does not quantize: "
                        f"{few(extra)}")
    if problems:
        return [Check("quantized_weights", FAIL, few(problems, 3, sort=False, sep="; "))]
    return [Check("quantized_weights", PASS, f"{len(layout.scales)} Linear weights stored as {scheme.qdtype.name} with "
                  f"{scheme.name} scales")]


def _config_dtype(ctx: Context) -> Any:
    name = ctx.config_value("dtype") or ctx.config_value("torch_dtype")
    return dtypes.ALIASES.get(str(name)) if name else None


def without_scales(ctx: Context) -> dict[str, Any]:
    """The stored tensors the skeleton should see: all but the recognised scales, and MoE experts under the
    names save_pretrained gives them (llm-compressor saves Mixtral's ``w1/w3/w2`` as ``gate/up/down_proj``)."""
    layout: Layout | None = getattr(ctx, "quant", None)
    if layout is None:
        return ctx.stored.tensors
    scales = set(layout.scales.values())
    family = family_of(ctx.config or {})
    leaves = family.leaves if family is not None else LINEARIZED_LEAVES
    return {expert_leaf_renamed(n, LINEARIZED_LEAVES, leaves): t for n, t in ctx.stored.tensors.items()
            if n not in scales}


def split_reference(ctx: Context, ref: Reference) -> tuple[Reference, dict[str, TensorSpec]]:
    """``(the reference without quantized weights and scales, {quantized weight: its source spec})``."""
    layout: Layout = ctx.quant
    quantized = {n: s for n, s in ref.tensors.items() if n in layout.scales}
    scales = set(layout.scales.values())
    rest = {n: s for n, s in ref.tensors.items() if n not in quantized and n not in scales}
    return Reference(ref.label, rest, ref.dropped + sorted(scales), ref.depth), quantized


def check_dequantized(ctx: Context, quantized: dict[str, TensorSpec], depth: str) -> Check:
    """``source_quantized``: sampled (or all) rows of each quantized weight, dequantized, against the source."""
    layout: Layout = ctx.quant
    far: dict[str, str] = {}
    rows_compared = 0
    for name, spec in quantized.items():
        t, s = ctx.stored.tensors[name], ctx.stored.tensors[layout.scales[name]]
        if t.shape != spec.shape:
            far[name] = f"has shape {list(t.shape)}, the source {list(spec.shape)}"
            continue
        rows = range(t.shape[0]) if depth == "full" else sorted({0, t.shape[0] // 2, t.shape[0] - 1})
        for row in rows:
            excess = _row_excess(t, s, spec, row, layout.scheme)
            rows_compared += 1
            if excess > 0:
                far[name] = f"row {row} is off by up to {excess:.3g} beyond the {layout.scheme.name} rounding bound"
                break
    if far:
        return Check("source_quantized", FAIL, few([f"{n} {why}" for n, why in far.items()], 3, sort=False,
                                                   sep="; ") + ": the quantized weights do not hold the source's")
    return Check("source_quantized", PASS, f"{len(quantized)} quantized weights dequantize to the source within the "
                 f"{layout.scheme.name} rounding bound ({rows_compared} rows)")


def _read(spec: Any, first: int, count: int) -> bytearray:
    size = spec.dtype.itemsize
    out = bytearray(count * size)
    pos = 0
    for chunk in iter_chunks(list(sub_segments(spec.segments, first * size, count * size)), max(len(out), 1)):
        out[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    return out


def _row_excess(t: Any, s: Any, spec: TensorSpec, row: int, scheme: Scheme) -> float:
    """How far one dequantized row is beyond the bound (<= 0: within it)."""
    import torch

    from vllm_consolidate.plan.lora_rows import merged_rows

    cols = t.shape[1]
    work = s.dtype.torch
    q = torch.frombuffer(_read(_segments(t), row * cols, cols), dtype=t.dtype.torch).to(torch.float32)
    srow = row // scheme.rows_per_group()
    scols = s.shape[1]
    scale = torch.frombuffer(_read(_segments(s), srow * scols, scols), dtype=work).to(torch.float32)
    if scheme.block is not None:
        scale = scale.repeat_interleave(scheme.block)[:cols]
    src = _read(spec, row * cols, cols)
    if spec.delta is not None:
        w = torch.frombuffer(merged_rows(spec, row, 1, memoryview(src)), dtype=torch.float32)
    else:
        w = torch.frombuffer(src, dtype=spec.dtype.torch)
    w = w.to(work).to(torch.float32)
    err = (q * scale - w).abs()
    if scheme.kind == "int":
        bound = scale * (0.5 + 2**-7 * (w / scale).abs()) + 2**-7 * w.abs()
    else:
        bound = 2**-3 * w.abs() + scale * 2**-9
    excess = float((err - bound).max()) if cols else 0.0
    return excess if not math.isnan(excess) else math.inf


def _segments(t: Any) -> TensorSpec:
    """A stored tensor as a one-segment spec, to read it like a source tensor."""
    from vllm_consolidate.source import Segment

    return TensorSpec(t.name, t.dtype, t.shape, [Segment(str(t.path), t.offset, t.nbytes)])
