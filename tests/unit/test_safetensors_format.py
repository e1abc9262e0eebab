"""Our safetensors header, byte for byte the one ``safetensors.torch.save_file`` writes for the same tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vllm_consolidate import dtypes
from vllm_consolidate.formats.safetensors import HeaderEntry, header_bytes, stored_safetensors


def _entries(tensors: dict[str, torch.Tensor]) -> list[HeaderEntry]:
    out, offset = [], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        out.append(HeaderEntry(name, dtypes.of(t.dtype), tuple(t.shape), offset, offset + n))
        offset += n
    return out


@pytest.mark.parametrize("tensors", [
    {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16)},
    {"x": torch.zeros(1, dtype=torch.int64), "y": torch.zeros(2, 3, dtype=torch.float16), "z": torch.zeros(0)},
    {f"layer.{i}.w": torch.zeros(i + 1, 2, dtype=torch.float32) for i in range(12)},
])
def test_header_bytes_equal_save_file(tensors: dict[str, torch.Tensor], tmp_path: Path) -> None:
    # save_file sorts by dtype alignment then name; write ours in the order its header lists.
    path = tmp_path / "ref.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    raw = path.read_bytes()
    ref_header = raw[: 8 + int.from_bytes(raw[:8], "little")]
    order = [t.name for t in sorted(stored_safetensors(path), key=lambda t: t.offset)]
    assert header_bytes(_entries({name: tensors[name] for name in order})) == ref_header


def test_header_is_padded_to_8_bytes() -> None:
    raw = header_bytes([HeaderEntry("w", dtypes.float32, (1,), 0, 4)])
    assert (len(raw) - 8) % 8 == 0 and int.from_bytes(raw[:8], "little") == len(raw) - 8
