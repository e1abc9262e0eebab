"""Reader for Hugging Face model folders (sharded or single safetensors / .bin). PLACEHOLDER: issue 4."""

from __future__ import annotations

from pathlib import Path

from vllm_consolidate.errors import UnsupportedCheckpointError
from vllm_consolidate.source import SourceModel

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_hf_folder(path: Path) -> bool:
    """True if the folder holds HF weights."""
    return path.is_dir() and any((path / n).exists() for n in WEIGHT_FILES)


def read_hf(folder: Path) -> SourceModel:
    raise UnsupportedCheckpointError("HF inputs are not supported yet", path=folder)
