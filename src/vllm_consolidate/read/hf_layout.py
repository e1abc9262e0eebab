"""Which weight files of an HF model folder are read: the layouts of :mod:`.hf` and how each is detected.

A weight-file name counts as present when anything but a folder holds it (a FIFO, a device, a
broken symlink): the reader then refuses it with an error naming it, instead of acting as if it
were absent or, worse, blocking on a FIFO.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError
from vllm_consolidate.formats.dcp import is_dcp_folder

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)

SHARD_RE = {
    "safetensors": re.compile(r"^model-\d+-of-\d+\.safetensors$"),
    "bin": re.compile(r"^pytorch_model-\d+-of-\d+\.bin$"),
}


@dataclass
class Layout:
    """Which weight files of a folder are read."""

    folder: Path
    fmt: str  # "safetensors" or "bin"
    files: list[Path]
    index: Path | None
    nested: bool = False


# -- detection ------------------------------------------------------------------------------------------


def _present(path: Path) -> bool:
    """A weight-file name is taken: by a file, a FIFO or device, or a symlink (even a broken one), but
    not by a folder. Reading it then refuses anything but a regular file inside the model, with an
    error naming it, rather than acting as if it were absent."""
    return os.path.lexists(path) and not path.is_dir()


def _has_weights(path: Path) -> bool:
    if any(_present(path / n) for n in WEIGHT_FILES):
        return True
    try:
        return any(rx.match(p.name) for p in path.iterdir() for rx in SHARD_RE.values())
    except OSError:
        return False


def is_hf_folder(path: Path) -> bool:
    """True if the folder holds HF weights, a nested ``pytorch_model.bin/`` folder, or a DCP folder.

    DCP folders count so that reading them gives a clear "unsupported" error instead of "not found".
    """
    path = Path(path)
    if not path.is_dir():
        return False
    return _has_weights(path) or (path / BIN_SINGLE).is_dir() or is_dcp_folder(path)


def _dcp_error(folder: Path) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        "this is a torch.distributed.checkpoint (DCP) folder (.metadata + *.distcp files), not HF weights",
        path=folder / ".metadata", hint="Pass --type dcp (or --type auto) to convert it.")


def find_layout(folder: Path, *, nested: bool = False) -> Layout:
    """The weight files of ``folder`` in the order ``from_pretrained`` looks for them.

    Raises:
        CorruptCheckpointError: Shard files without their index.
        UnsupportedCheckpointError: A DCP folder, a nested folder without weights, or no weights at all.
    """
    if _present(folder / SAFE_SINGLE):
        return Layout(folder, "safetensors", [folder / SAFE_SINGLE], None, nested)
    if _present(folder / SAFE_INDEX):
        return Layout(folder, "safetensors", [], folder / SAFE_INDEX, nested)
    if _present(folder / BIN_SINGLE):
        return Layout(folder, "bin", [folder / BIN_SINGLE], None, nested)
    if _present(folder / BIN_INDEX):
        return Layout(folder, "bin", [], folder / BIN_INDEX, nested)
    for fmt, index_name in (("safetensors", SAFE_INDEX), ("bin", BIN_INDEX)):
        shards = sorted(p for p in folder.iterdir() if SHARD_RE[fmt].match(p.name))
        if shards:
            raise CorruptCheckpointError(
                f"{shards[0].name} and {len(shards) - 1} more shard files are here but their index "
                f"{index_name} is missing",
                path=folder / index_name,
                hint=f"Copy {index_name} from where the shards came from; without it the shards cannot be trusted.",
            )
    if is_dcp_folder(folder):
        raise _dcp_error(folder)
    inner = folder / BIN_SINGLE
    if inner.is_dir() and not nested:
        if is_dcp_folder(inner):
            raise _dcp_error(inner)
        if not _has_weights(inner):
            found = sorted(p.name for p in inner.iterdir())[:8]
            raise UnsupportedCheckpointError(
                f"{BIN_SINGLE} is a folder, but it holds no weights this tool reads "
                f"(found: {', '.join(found) or 'nothing'})",
                path=inner,
                hint=(
                    "It should hold pytorch_model.bin, model.safetensors, or shards with their index.json, as "
                    "DeepSpeed's zero_to_fp32.py writes. Pass the DeepSpeed checkpoint itself with --type deepspeed."
                ),
            )
        return find_layout(inner, nested=True)
    raise UnsupportedCheckpointError(
        f"no HF weights here: expected one of {', '.join(WEIGHT_FILES)}",
        path=folder,
        hint="Pass the folder that holds the model's weights.",
    )



__all__ = ["BIN_INDEX", "BIN_SINGLE", "SAFE_INDEX", "SAFE_SINGLE", "SHARD_RE", "WEIGHT_FILES", "Layout", "is_hf_folder",
           "find_layout"]
