"""Plan the output from metadata alone: which file each tensor goes to, its dtype and byte offset.

The plan is complete before a single tensor byte is read, in the manner of huggingface_hub's
``split_torch_state_dict_into_shards``: tensors are packed, in order, into files of at most
``max_shard_size`` bytes (a tensor larger than that gets a file of its own). One file is named
``model.safetensors`` (or ``pytorch_model.bin``); several are ``model-0000i-of-0000N.safetensors``
with a ``model.safetensors.index.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import UsageError
from vllm_consolidate.source import TensorSpec

#: ``--dtype`` names and their aliases (one home: :data:`vllm_consolidate.dtypes.ALIASES`).
DTYPES_BY_NAME = dtypes.ALIASES


def dtype_name(dtype: DType) -> str:
    """``bfloat16`` (also for a torch dtype)."""
    return dtypes.of(dtype).name


@dataclass
class PlannedTensor:
    """One tensor's place in the output."""

    spec: TensorSpec
    out_dtype: DType
    offset: int = 0  # from the start of the file's data section
    # --quantize: how this weight is quantized (a plan.quantize.QuantTarget) and its scale's slot, written with it
    quant: Any = None
    scale: PlannedTensor | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def nbytes(self) -> int:
        return self.spec.numel * self.out_dtype.itemsize


@dataclass
class PlannedFile:
    """One output file and the tensors it holds, with offsets assigned."""

    filename: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class OutputPlan:
    """The whole output, decided from metadata."""

    format: str  # "safetensors" or "bin"
    files: list[PlannedFile]
    index_filename: str | None

    @property
    def total_size(self) -> int:
        return sum(f.data_size for f in self.files)

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for f in self.files for t in f.tensors]

    def index(self) -> dict | None:
        """The HF ``*.index.json`` content, when there are several files."""
        if self.index_filename is None:
            return None
        return {
            "metadata": {"total_size": self.total_size},
            "weight_map": {t.name: f.filename for f in self.files for t in f.tensors},
        }


def output_dtype(spec: TensorSpec, target: DType | None) -> DType:
    """Floating tensors take ``target`` (None keeps the stored dtype); others keep their dtype."""
    if target is None or not spec.dtype.is_floating_point:
        return spec.dtype
    return target


def plan_output(
    tensors: list[TensorSpec],
    *,
    target_dtype: DType | None,
    max_shard_size: int,
    fmt: str = "safetensors",
    stem: str | None = None,
    out_dtypes: dict[str, DType] | None = None,
    quant: dict[str, Any] | None = None,
) -> OutputPlan:
    """Assign every tensor to an output file and byte offset.

    Args:
        tensors: What to write, in order.
        target_dtype: dtype for floating-point tensors, or None to keep each tensor's own.
        max_shard_size: Largest file size in bytes before splitting.
        fmt: ``"safetensors"`` or ``"bin"``.
        stem: The file name before the extension (default: ``model`` / ``pytorch_model``; a peft adapter
            folder's is ``adapter_model``).
        out_dtypes: Per-tensor output dtypes that override ``target_dtype`` (``--quantize``).
        quant: ``--quantize``: weight name -> its :class:`~vllm_consolidate.plan.quantize.QuantTarget`; each such
            weight's scale (named by the target) is kept in the weight's file, since one job writes both.

    Returns:
        The plan.
    """
    if fmt not in ("safetensors", "bin"):
        raise UsageError(f"unknown output format {fmt}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"two tensors are both named {dup}")
    target_dtype = dtypes.of(target_dtype) if target_dtype is not None else None
    out_dtypes, quant = out_dtypes or {}, quant or {}
    scales = {q.scale_name: name for name, q in quant.items()}
    by_name: dict[str, PlannedTensor] = {}
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for spec in tensors:
        planned = PlannedTensor(spec, out_dtypes.get(spec.name) or output_dtype(spec, target_dtype),
                                quant=quant.get(spec.name))
        by_name[spec.name] = planned
        if not planned.out_dtype.safetensors:
            raise UsageError(f"{spec.name} has dtype {planned.out_dtype}, which the output format cannot hold")
        if spec.name in scales:
            by_name[scales[spec.name]].scale = planned
        if shards[-1] and size + planned.nbytes > max_shard_size and spec.name not in scales:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += planned.nbytes
    default, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    stem = stem or default
    n = len(shards)
    files = []
    for i, shard in enumerate(shards, start=1):
        filename = f"{stem}.{ext}" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.{ext}"
        offset = 0
        for t in shard:
            t.offset = offset
            offset += t.nbytes
        files.append(PlannedFile(filename, shard))
    return OutputPlan(fmt, files, None if n == 1 else f"{stem}.{ext}.index.json")
