"""Fixtures of the validate unit tests: hand-made safetensors folders, header and bytes written directly (no torch)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

# dtype code -> (struct format, bytes per element)
_FORMATS = {"F64": ("d", 8), "F32": ("f", 4), "F16": ("e", 2), "I64": ("q", 8), "U16": ("H", 2)}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], list[float]]]) -> Path:
    """Write ``{name: (dtype code, shape, flat values)}`` as a safetensors file, in the given order."""
    header: dict[str, object] = {}
    data = b""
    for name, (code, shape, values) in tensors.items():
        fmt, size = _FORMATS[code]
        raw = struct.pack(f"<{len(values)}{fmt}", *values)
        assert len(raw) == size * len(values)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def tiny_model(folder: Path, *, vocab: int = 4, hidden: int = 2, **config: object) -> Path:
    """A folder with config.json and one model.safetensors (embedding and one norm), like a tiny Llama."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", {
        "model.embed_tokens.weight": ("F32", [vocab, hidden], [0.5] * (vocab * hidden)),
        "model.norm.weight": ("F32", [hidden], [1.0] * hidden),
    })
    doc = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
           "torch_dtype": "float32"}
    doc.update(config)
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture
def st_file() -> Callable[..., Path]:
    """:func:`write_safetensors`."""
    return write_safetensors


@pytest.fixture
def model_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: :func:`tiny_model` in a fresh folder (``model_folder(vocab=8, torch_dtype="bfloat16")``)."""
    count = iter(range(1000))

    def make(**kwargs: object) -> Path:
        return tiny_model(tmp_path / f"m{next(count)}", **kwargs)

    return make
