"""Write one planned ``.bin`` file (``--pytorch-bin``) with torch's own archive writer.

The pickle is written from stand-ins that name each tensor's storage, so no tensor is built to
pickle it; then each tensor is materialised once (its source chunks copied, and cast, into one torch
tensor) while its record is written. Peak memory is therefore the largest tensor, unlike the
safetensors path, which streams.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

from vllm_consolidate.dtypes import DType
from vllm_consolidate.plan.lora_rows import merged_rows, row_length
from vllm_consolidate.plan.shards import PlannedFile
from vllm_consolidate.read.ranges import OpenFiles, iter_chunks
from vllm_consolidate.write.safetensors import CHUNK_BYTES, ProgressFn


class _StorageStub:
    def __init__(self, key: str, dtype: DType, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles exactly like a contiguous CPU tensor saved by ``torch.save``, without holding its data."""

    def __init__(self, storage: _StorageStub, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        import torch

        stride, acc = [], 1
        for size in reversed(self.shape):
            stride.append(acc)
            acc *= size
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, torch.Size(self.shape), tuple(reversed(stride)), False, OrderedDict()))


class _StatePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageStub):
            import torch

            return ("storage", getattr(torch, obj.dtype.storage), obj.key, "cpu", obj.numel)
        return None


def write_bin_file(pfile: PlannedFile, path: Path | Any, progress: ProgressFn | None = None) -> None:
    """Write one planned file in ``torch.save``'s zip format, loadable with ``weights_only=True``.

    Uses torch's own archive writer, so alignment and zip64 match ``torch.save``. Each tensor is
    materialised once while its record is written, so peak memory is the largest tensor. ``path``
    may also be a sequential writer (an object being uploaded: anything with ``write``).
    """
    import torch

    stubs: OrderedDict[str, _TensorStub] = OrderedDict()
    for i, t in enumerate(pfile.tensors):
        stubs[t.name] = _TensorStub(_StorageStub(str(i), t.out_dtype, t.spec.numel), t.spec.shape)
    pickled = io.BytesIO()
    _StatePickler(pickled, protocol=2).dump(stubs)
    files = OpenFiles()
    writer = torch._C.PyTorchFileWriter(str(path) if isinstance(path, Path) else path)
    try:
        writer.write_record("data.pkl", pickled.getvalue(), len(pickled.getvalue()))
        writer.write_record("byteorder", b"little", len(b"little"))
        for i, t in enumerate(pfile.tensors):
            out = torch.empty(t.spec.numel, dtype=t.out_dtype.torch)
            step = max(1, CHUNK_BYTES // max(t.spec.dtype.itemsize, t.out_dtype.itemsize))
            cols = row_length(t.spec)
            if t.spec.delta is not None:  # a LoRA merge: whole rows, merged in float32 (see plan.lora)
                step = max(1, step // cols) * cols
            first = 0
            for chunk in iter_chunks(t.spec.segments, step * t.spec.dtype.itemsize, files=files):
                if t.spec.delta is not None:
                    rows = len(chunk) // t.spec.dtype.itemsize // cols
                    chunk = merged_rows(t.spec, first // cols, rows, chunk)
                    src = torch.frombuffer(chunk, dtype=torch.float32)
                else:
                    src = torch.frombuffer(chunk, dtype=t.spec.dtype.torch)
                out[first : first + len(src)].copy_(src)
                first += len(src)
            writer.write_record(f"data/{i}", out.data_ptr(), out.numel() * out.element_size())
            if progress:
                progress(t.nbytes)
            del out
        writer.write_end_of_file()
    finally:
        files.close()
    del writer
