"""Reader for verl FSDP checkpoints: ``global_step_N/{actor,critic}/model_world_size_W_rank_R.pt``.

verl's ``FSDPCheckpointManager`` saves, per rank, ``torch.save`` of the FSDP model's sharded state
dict (DTensors), next to ``fsdp_config.json`` (``{"FSDP_version": 1|2, "world_size": W}``) and a
``huggingface/`` folder with the config, tokenizer and generation config. The run folder holds
``latest_checkpointed_iteration.txt``.

Supported layouts: each tensor is a DTensor whose placements are ``Replicate()`` and at most one
``Shard(0)`` (FSDP, FSDP2 and HSDP meshes), or a plain tensor saved whole by every rank. Refused,
with a message naming the placement: ``Shard`` on another dimension or on two mesh dimensions
(FSDP with tensor parallelism), ``Partial`` and strided shards. A LoRA run's rank files hold the whole
peft model (base layers and factors, under peft names); :func:`vllm_consolidate.plan.lora.merge_lora`
merges it with the ``r`` and ``lora_alpha`` verl records in ``lora_train_meta.json``.

Each rank's box of a tensor follows ``torch.chunk`` semantics on its mesh coordinate (as
``Shard._local_shard_size_and_offset`` does), and must match the local tensor the file holds.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from vllm_consolidate import safe_io
from vllm_consolidate.errors import (
    CorruptCheckpointError,
    InputNotFoundError,
    UnsafeInputError,
    UnsupportedCheckpointError,
    naming_file,
)
from vllm_consolidate.formats import dtensor
from vllm_consolidate.formats.dtensor import DTensorShard
from vllm_consolidate.formats.torch_zip import TensorRef, load_lazy
from vllm_consolidate.limits import brief
from vllm_consolidate.read.chunks import Piece, assemble
from vllm_consolidate.read.dcp import stored_dtype
from vllm_consolidate.read.hf import check_weight_file, strip_wrapper_prefixes
from vllm_consolidate.source import SourceModel, TensorSpec

#: Canonical ASCII numbers only: ``rank_01`` or ``rank_١`` must not stand for rank 1.
RANK_FILE = re.compile(r"^model_world_size_(0|[1-9][0-9]*)_rank_(0|[1-9][0-9]*)\.pt$")
FSDP_CONFIG = "fsdp_config.json"
HF_FOLDER = "huggingface"
LORA_FOLDER = "lora_adapter"
MAX_WORLD_SIZE = 1 << 16
LORA_META = "lora_train_meta.json"


def rank_files(folder: Path) -> dict[int, dict[int, Path]]:
    """``{world size: {rank: file}}`` of the model rank files in a verl role folder."""
    out: dict[int, dict[int, Path]] = {}
    try:
        entries = list(folder.iterdir())
    except OSError:
        return out
    for path in entries:
        m = RANK_FILE.match(path.name)
        if m:
            out.setdefault(int(m.group(1)), {})[int(m.group(2))] = path
    return out


def is_verl_role_folder(path: Path) -> bool:
    """True if ``path`` holds verl model rank files (an ``actor`` or ``critic`` folder)."""
    return path.is_dir() and bool(rank_files(path))


_ANY_RANK_FILE = re.compile(r"^model_world_size_\w+_rank_\w+\.pt$")


def _world(folder: Path) -> tuple[int, dict[int, Path], dict[str, Any]]:
    found = rank_files(folder)
    canonical = {p.name for files in found.values() for p in files.values()}
    odd = sorted(p.name for p in folder.iterdir() if _ANY_RANK_FILE.match(p.name) and p.name not in canonical)
    if odd:  # rank_01 next to rank_1: which one holds rank 1 cannot be known
        raise CorruptCheckpointError(
            f"{brief(odd[0])} is named like a rank file but its numbers are not written as verl writes them; "
            "two files may stand for one rank", path=folder / odd[0], hint="Remove the stray file.")
    if not found:
        raise InputNotFoundError("no verl rank files (model_world_size_W_rank_R.pt) here", path=folder)
    if len(found) > 1:
        raise CorruptCheckpointError(
            f"rank files of more than one world size are mixed here: {', '.join(map(str, sorted(found)))}",
            path=folder, hint="Keep only the files of one save in the folder.")
    world, files = next(iter(found.items()))
    config = _fsdp_config(folder, world)
    if not 0 < world <= MAX_WORLD_SIZE:
        raise CorruptCheckpointError(f"world size {world} in the rank file names", path=folder)
    missing = [r for r in range(world) if r not in files]
    extra = sorted(r for r in files if r >= world)
    if missing or extra:
        raise CorruptCheckpointError(
            f"world size {world} needs rank files 0..{world - 1}; "
            + (f"missing: {', '.join(map(str, missing[:16]))}{', ...' if len(missing) > 16 else ''}" if missing
               else f"unexpected ranks {extra}"),
            path=folder, hint="Copy every model_world_size_*_rank_*.pt file of the checkpoint.")
    return world, files, config


def _fsdp_config(folder: Path, world: int) -> dict[str, Any]:
    """The role folder's ``fsdp_config.json`` (empty if absent), checked against the rank files' world size.

    Like every file read from a checkpoint, it must be a regular file that resolves inside the folder
    it is in (a link to the run folder or elsewhere is refused, not followed).

    Raises:
        UnsafeInputError: It links out of the role folder.
        CorruptCheckpointError: Not a regular file, not strict JSON, or a world size other than the files'.
    """
    path = folder / FSDP_CONFIG
    if not os.path.lexists(path):
        return {}
    if not safe_io.confined(path, [folder]):
        raise UnsafeInputError(
            f"{FSDP_CONFIG} resolves to {os.path.realpath(path)}, outside {folder}; refusing to read it", path=path,
            hint="Copy the real file into the role folder (a link out of it is never followed).")
    config = safe_io.read_json(path, what=FSDP_CONFIG)
    declared = config.get("world_size")
    if declared is not None and (type(declared) is not int or declared != world):
        kind = "" if type(declared) is int else f" (a {type(declared).__name__}, not an integer)"
        raise CorruptCheckpointError(
            f"{FSDP_CONFIG} says world_size {brief(declared)}{kind}, but the rank files are for world size {world}",
            path=path, hint="The folder mixes two saves; copy the checkpoint again.")
    return config


def _box(shard: DTensorShard, mesh: tuple[int, ...], where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the part of the tensor this rank holds."""
    offsets, sizes = [0] * len(shard.shape), list(shard.shape)
    for placement, coord, size in zip(shard.placements, shard.coordinate or (), mesh):
        if placement.kind == "replicate":
            continue
        if placement.kind != "shard" or placement.dim != 0:
            raise UnsupportedCheckpointError(
                f"{where} is placed as {', '.join(map(str, shard.placements))}; only Shard(0) and Replicate() "
                "(FSDP, FSDP2, HSDP) are supported, not tensor parallelism, Partial or strided shards",
                hint="Convert it with verl's model_merger, which gathers it with torch.")
        n = sizes[0]
        chunk = -(-n // size)
        start = min(coord * chunk, n)
        offsets[0] += start
        sizes[0] = max(0, min(n, start + chunk) - start)
    return tuple(offsets), tuple(sizes)


def _mesh(shards: dict[int, DTensorShard], world: int, where: str, path: Path) -> tuple[int, ...]:
    """Mesh size per dimension, from every rank's recorded coordinate (1-D meshes: the rank)."""
    coords = {r: s.coordinate if s.coordinate is not None else (r,) if len(s.placements) == 1 else None
              for r, s in shards.items()}
    if any(c is None for c in coords.values()):
        raise UnsupportedCheckpointError(f"{where} has a multi-dimensional mesh without recorded coordinates",
                                         path=path)
    ndim = len(next(iter(coords.values())))
    mesh = tuple(max(c[i] for c in coords.values()) + 1 for i in range(ndim))
    if len(set(coords.values())) != world or math.prod(mesh) != world:
        raise CorruptCheckpointError(f"the rank files' mesh coordinates for {where} do not form one mesh of "
                                     f"{world} ranks", path=path)
    return mesh


def _tensor(name: str, parts: dict[int, Any], world: int, files: dict[int, Path]) -> TensorSpec:
    first = parts[0]
    if type(first) is TensorRef:  # a plain tensor, saved whole by every rank
        odd = next((r for r, p in parts.items() if type(p) is not TensorRef or p.shape != first.shape), None)
        if odd is not None:
            raise CorruptCheckpointError(f"rank {odd} disagrees with rank 0 on {brief(name)}", path=files[odd])
        return TensorSpec(name, first.dtype, first.shape, [first.segment()])
    odd = next((r for r, p in parts.items() if type(p) is not DTensorShard or p.shape != first.shape
                or p.placements != first.placements), None)
    if odd is not None:
        raise CorruptCheckpointError(f"rank {odd} disagrees with rank 0 on the shape or placement of {brief(name)}",
                                     path=files[odd])
    mesh = _mesh(parts, world, name, files[0])
    boxes: dict[tuple, Piece] = {}
    for rank in sorted(parts):
        box = _box(parts[rank], mesh, name)
        boxes.setdefault(box, Piece(box[0], box[1], parts[rank].local))  # replicas: the lowest rank's copy
    with naming_file(files[0]):
        segments = assemble(first.shape, list(boxes.values()), name)
    return TensorSpec(name, first.local.dtype, first.shape, segments)


def _load_rank(path: Path, roots: list[Path]) -> dict[str, Any]:
    check_weight_file(path, roots)
    state = load_lazy(path, allow=dtensor.ALLOW)
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
        raise CorruptCheckpointError("not a state dict (a mapping of names to tensors)", path=path)
    return state


def read_verl(folder: Path, root: Path | None = None) -> SourceModel:
    """Describe the model in a verl role folder (``actor`` or ``critic``), reading metadata only.

    Raises:
        CorruptCheckpointError: Missing rank files, a world size that disagrees with ``fsdp_config.json``,
            or ranks that disagree.
        UnsupportedCheckpointError: A placement other than Shard(0) / Replicate().
        UnsafePickleError: A rank file's pickle is refused by the allowlist.
    """
    folder = Path(folder)
    roots = [Path(root) if root is not None else folder]
    world, files, fsdp_config = _world(folder)
    states = {rank: _load_rank(files[rank], roots) for rank in range(world)}
    keys = list(states[0])
    for rank, state in states.items():
        if set(state) != set(keys):
            odd = sorted(set(state) ^ set(keys))
            raise CorruptCheckpointError(f"rank {rank} holds other tensors than rank 0 (e.g. {brief(odd[0])})",
                                         path=files[rank], hint="The rank files come from different saves.")
    specs, renamed, aliases, by_bytes = [], {}, {}, {}
    for key in keys:
        name = strip_wrapper_prefixes(key)
        if name != key:
            renamed[key] = name
        spec = _tensor(name, {r: states[r][key] for r in states}, world, files)
        place = (spec.shape, tuple(spec.segments))
        if place in by_bytes:  # one storage saved under two names: tied weights
            aliases[name] = by_bytes[place]
            continue
        by_bytes[place] = name
        specs.append(spec)
    stored = stored_dtype(specs)
    placements = sorted({", ".join(map(str, v.placements)) for v in states[0].values() if type(v) is DTensorShard})
    info = {
        "type": "verl",
        "role": folder.name,
        "world_size": world,
        "fsdp_version": fsdp_config.get("FSDP_version"),
        "placements": placements,
        "tag": folder.parent.name,
        "stored_dtype": stored.name if stored else None,
    }
    return SourceModel(kind="verl", path=folder, tensors=specs, asset_dirs=asset_dirs(folder), info=info,
                       aliases=aliases, renamed=renamed,
                       trained_dtype=stored if stored and stored.itemsize == 2 else None)


def asset_dirs(folder: Path) -> list[Path]:
    """Where a verl role folder keeps its model's config and tokenizer: ``huggingface/`` beside the rank files."""
    return [folder / HF_FOLDER]


__all__ = ["FSDP_CONFIG", "LORA_FOLDER", "LORA_META", "RANK_FILE", "asset_dirs", "is_verl_role_folder", "rank_files",
           "read_verl"]
