"""Reader for torch.distributed.checkpoint (DCP) folders: FSDP/FSDP2, HF Trainer and Accelerate FSDP
(``pytorch_model_fsdp_0/``), torchtitan and torchtune.

A DCP folder holds the flattened state dict of whatever the trainer saved: the model, usually the
optimizer, and sometimes schedulers or data-loader state. This reader takes the model's tensors
only, from metadata and each chunk's archive header, and never reads tensor data.

Which keys are the model. ``dcp.save`` flattens nested dicts: ``{"model": sd, "optim": osd}``
becomes ``model.<name>`` and ``optim.state.<name>.exp_avg``; the save planner records each key's
nested path. The model is the container whose keys are Hugging Face parameter names (they start
with ``model.``, ``lm_head.``, ``transformer.`` and the like). Optimizer state (under ``optim*``, or
any ``state`` / ``param_groups`` subtree), schedulers and other non-tensor entries are dropped. A
container nested in another that also qualifies wins (``{"model": sd}`` of a tied model, whose keys
all start with ``model.model.``). Two unrelated qualifying containers (``model`` and ``ema``) are
ambiguous: the reader refuses and names them, and ``--model-key`` picks one (``""`` for top level).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import (
    ConsolidateError,
    CorruptCheckpointError,
    UnsupportedCheckpointError,
    UsageError,
    naming_file,
)
from vllm_consolidate.formats import dcp
from vllm_consolidate.formats.torch_zip import TensorRef, load_lazy
from vllm_consolidate.limits import brief
from vllm_consolidate.read.chunks import Piece, assemble, check_tiling
from vllm_consolidate.read.hf import check_weight_file, strip_wrapper_prefixes
from vllm_consolidate.safe_io import open_source
from vllm_consolidate.source import SourceModel, TensorSpec

#: First components of Hugging Face parameter names (a model's state dict keys start with one).
HF_ROOTS = frozenset({
    "model", "lm_head", "transformer", "gpt_neox", "language_model", "embed_out", "score", "backbone",
    "decoder", "encoder", "shared", "final_logits_bias", "multi_modal_projector", "vision_tower", "visual",
    "vision_model", "v_head", "value_head", "classifier", "qa_outputs", "mtp",
})
#: Containers that are never the model.
NOT_MODEL = frozenset({
    "optim", "optimizer", "optimizers", "opt", "optim_state", "optimizer_state", "optimizer_states",
    "optim_state_dict", "optimizer_state_dict", "lr_scheduler", "lr_schedulers", "scheduler", "dataloader",
    "train_state", "rng", "rng_state", "extra_state", "state", "param_groups",
})
_HINT_KEY = "Pick one with --model-key NAME (--model-key '' for the top level)."


def _container_of(key: str, paths: dict[str, tuple[str, ...]]) -> str | None:
    """The container a key was saved in, from the planner's record (None when not recorded)."""
    path = paths.get(key)
    return ".".join(path[:-1]) if path else None


def _prefixes(key: str, depth: int = 3) -> Iterable[str]:
    parts = key.split(".")
    yield ""
    for i in range(1, min(depth, len(parts) - 1) + 1):
        yield ".".join(parts[:i])


def _under(key: str, container: str) -> str | None:
    if not container:
        return key
    return key[len(container) + 1:] if key.startswith(container + ".") else None


def _is_state(container: str) -> bool:
    return not any(part in NOT_MODEL for part in container.split(".") if part)


def _is_model_state(key: str, paths: dict[str, tuple[str, ...]]) -> bool:
    """Not optimizer or scheduler state: judged by the recorded container, else by the key's own parts."""
    container = _container_of(key, paths)
    return _is_state(container if container is not None else key.rsplit(".", 1)[0])


def _hf_like(names: list[str]) -> bool:
    return bool(names) and all(strip_wrapper_prefixes(n).split(".", 1)[0] in HF_ROOTS for n in names)


def model_keys(keys: list[str], paths: dict[str, tuple[str, ...]], model_key: str | None,
               where: Path) -> tuple[str, dict[str, str]]:
    """The container holding the model and ``{key: parameter name}`` for its tensors.

    Raises:
        UsageError: ``--model-key`` names no container of tensors.
        UnsupportedCheckpointError: No container holds Hugging Face parameter names, or several do.
    """
    if model_key is not None:
        chosen = {k: n for k in keys if (n := _under(k, model_key)) is not None and _is_model_state(k, paths)}
        if not chosen:
            raise UsageError(f"--model-key {model_key!r} names no tensors in this checkpoint", path=where,
                             hint=f"Its top-level entries are: {', '.join(sorted({k.split('.')[0] for k in keys}))}.")
        return model_key, chosen
    containers = {c for k in keys if (c := _container_of(k, paths)) is not None} or {
        p for k in keys for p in _prefixes(k)}
    candidates = []
    for container in sorted(containers):
        if not _is_state(container):
            continue
        names = [n for k in keys if (n := _under(k, container)) is not None and _is_model_state(k, paths)]
        if _hf_like(names):
            candidates.append(container)
    # A qualifying container inside another qualifying one is the model (``{"model": sd}``).
    outer = {c for c in candidates for d in candidates if c != d and (c == "" or d.startswith(c + "."))}
    candidates = [c for c in candidates if c not in outer]
    if len(candidates) != 1:
        roots = sorted({k.split(".")[0] for k in keys})
        if not candidates:
            raise UnsupportedCheckpointError(
                "found no model weights with Hugging Face parameter names in this checkpoint (top-level entries: "
                f"{brief(', '.join(roots))})", path=where,
                hint="If the model is there under other names (torchtitan or torchtune's own), convert it with that "
                     "framework's Hugging Face exporter first. " + _HINT_KEY)
        raise UnsupportedCheckpointError(
            f"this checkpoint holds more than one model: {', '.join(repr(c or '(top level)') for c in candidates)}",
            path=where, hint=_HINT_KEY)
    chosen_container = candidates[0]
    return chosen_container, model_keys(keys, paths, chosen_container, where)[1]


def check_storage_files(folder: Path, meta: dcp.DcpMetadata, roots: list[Path]) -> None:
    """Every storage file the metadata names exists, is a regular file inside the input, and is long enough.

    Raises:
        CorruptCheckpointError: A file is missing or shorter than the chunks it should hold.
        UnsafeInputError: A file resolves outside the input.
    """
    ends: dict[str, int] = {}
    for tensor in meta.tensors.values():
        for chunk in tensor.chunks:
            ends[chunk.file] = max(ends.get(chunk.file, 0), chunk.offset + chunk.length)
    missing = [name for name in sorted(ends) if not os.path.lexists(folder / name)]
    if missing:
        raise CorruptCheckpointError(
            f"the .metadata lists {len(ends)} storage files, but {len(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: "
            f"{brief(', '.join(missing))}", path=meta.path,
            hint="The save did not finish, or files were lost in a copy. Copy the whole folder again.")
    for name, end in ends.items():
        path = folder / name
        check_weight_file(path, roots)  # the same confinement rule as HF shards
        src = open_source(path)
        size = src.size
        src.close()
        if size < end:
            raise CorruptCheckpointError(
                f"{name} is {size:,} bytes, but the .metadata places data up to byte {end:,}: it is truncated",
                path=path, hint="Copy the checkpoint again from where it was saved.")


def tied_entries(tensors: dict[str, dcp.DcpTensor], names: dict[str, str], where: Path,
                 ) -> tuple[dict[str, str], dict[str, dcp.DcpTensor]]:
    """Tied weights among the model's entries: ``({parameter name: the name it is tied to}, the rest)``.

    The same stored bytes under two names are tied weights (one storage saved under two names), but
    only when everything matches: dtype, shape and every chunk's place and storage. A forged entry
    pointing at another tensor's bytes under another shape is not tied; :func:`check_layout` then
    refuses it for sharing bytes.

    Raises:
        CorruptCheckpointError: Two entries have the same parameter name once wrapper prefixes are removed.
    """
    aliases: dict[str, str] = {}
    by_place: dict[tuple, str] = {}
    owner: dict[str, str] = {}
    stored_once: dict[str, dcp.DcpTensor] = {}
    for key, tensor in tensors.items():
        name = names[key]
        if name in owner:
            raise CorruptCheckpointError(f"tensors {brief(owner[name])} and {brief(key)} are both {brief(name)}",
                                         path=where)
        owner[name] = key
        place = (tensor.dtype, tensor.shape, tuple(sorted(tensor.chunks, key=lambda c: c.offsets)))
        if place in by_place:
            aliases[name] = by_place[place]
        else:
            by_place[place] = name
            stored_once[key] = tensor
    return aliases, stored_once


def check_layout(tensors: dict[str, dcp.DcpTensor], where: Path) -> None:
    """From the metadata alone: each tensor's chunks tile it, and no two chunks share a byte.

    Run before any chunk's archive is read, so a forged ``.metadata`` costs the time to read it and
    no more: the tiling check is O(n log n) in the chunks (:func:`~.chunks.check_tiling`), and the
    storage spans are sorted once. Two chunks whose archives overlap in one file would give one
    tensor's rows twice (or another tensor's), however the archives themselves look. Tied entries
    (:func:`tied_entries`) are passed once.

    Raises:
        CorruptCheckpointError: Chunks overlap, leave a gap, or share bytes of a storage file.
        UnsupportedCheckpointError: A tensor's chunks split it along too many dimensions.
    """
    for key, tensor in tensors.items():
        with naming_file(where):
            check_tiling(tensor.shape, [(c.offsets, c.sizes) for c in tensor.chunks], key)
    spans = sorted((c.file, c.offset, c.offset + c.length, key) for key, t in tensors.items() for c in t.chunks
                   if c.length)
    reach: tuple[str, int, str] = ("", 0, "")  # (file, end, tensor) of the span reaching furthest so far
    for file, start, end, key in spans:
        if file == reach[0] and start < reach[1]:
            whose = (f"two chunks of {brief(key)}" if key == reach[2] else
                     f"chunks of {brief(reach[2])} and {brief(key)}")
            raise CorruptCheckpointError(
                f"{whose} share bytes of {brief(file)} (byte {start:,} lies in both); a chunk's storage must be its "
                "own",
                path=where.parent / file, hint="The .metadata is damaged or forged: re-save the checkpoint.")
        if file != reach[0] or end > reach[1]:
            reach = (file, end, key)


def _piece(folder: Path, tensor: dcp.DcpTensor, chunk: dcp.DcpChunk) -> Piece:
    path = folder / chunk.file
    try:
        ref = load_lazy(path, start=chunk.offset, length=chunk.length)
    except ConsolidateError as exc:  # name the tensor: the file alone does not say which entry is broken
        raise type(exc)(f"the chunk of {brief(tensor.key)} at byte {chunk.offset}: {exc.message}", path=exc.path,
                        hint=exc.hint) from None
    if type(ref) is not TensorRef:
        raise CorruptCheckpointError(f"the chunk of {brief(tensor.key)} at byte {chunk.offset} is not a tensor",
                                     path=path)
    if ref.dtype is not tensor.dtype:
        raise CorruptCheckpointError(
            f"the chunk of {brief(tensor.key)} at byte {chunk.offset} holds {ref.dtype}, the .metadata says "
            f"{tensor.dtype}", path=path)
    return Piece(chunk.offsets, chunk.sizes, ref)


def read_dcp(folder: Path, root: Path | None = None, model_key: str | None = None) -> SourceModel:
    """Describe the model weights of a DCP folder, reading metadata and archive headers only.

    Args:
        folder: The folder holding ``.metadata`` and the ``.distcp`` files.
        root: The folder the user named, which storage files must not leave (default: ``folder``).
        model_key: The container holding the model (see the module docstring), when ambiguous.

    Raises:
        CorruptCheckpointError: Missing or truncated storage files, or inconsistent metadata.
        UnsupportedCheckpointError: No model or more than one, or storage transforms.
        UnsafePickleError: The metadata or a chunk's pickle is refused by the allowlist.
        UnsafeInputError: A storage file resolves outside the input.
    """
    folder = Path(folder)
    roots = [Path(root) if root is not None else folder]
    check_weight_file(folder / dcp.METADATA_FILE, roots)
    meta = dcp.read_metadata(folder)
    container, names = model_keys(list(meta.tensors), meta.paths, model_key, meta.path)
    entries = len(meta.tensors) + len(meta.byte_keys)
    selected = {key: meta.tensors[key] for key in names}
    meta.tensors = selected  # only the model's files must be present
    names_of = {key: strip_wrapper_prefixes(name) for key, name in names.items()}
    aliases, stored_once = tied_entries(selected, names_of, meta.path)
    check_storage_files(folder, meta, roots)  # present, regular, inside the input, long enough
    check_layout(stored_once, meta.path)  # from the metadata alone: before any archive is read
    specs: list[TensorSpec] = []
    renamed = {name: names_of[key] for key, name in names.items() if names_of[key] != name}
    for key, tensor in stored_once.items():
        name = names_of[key]
        # An empty chunk holds nothing: its archive is never needed (large worlds have many).
        pieces = [_piece(folder, tensor, c) for c in tensor.chunks if math.prod(c.sizes)]
        with naming_file(meta.path):
            segments = assemble(tensor.shape, pieces, name) if pieces else []
        specs.append(TensorSpec(name, tensor.dtype, tensor.shape, segments))
    stored = stored_dtype(specs)
    info = {
        "type": "dcp",
        "container": container or "(top level)",
        "world_size": len({f.split("_")[2] for f in meta.files if f.count("_") >= 3}) or None,
        "storage_files": len(meta.files),
        "dropped_entries": entries - len(names),  # optimizer state, schedulers, steps
        "dcp_version": meta.version,
        "stored_dtype": stored.name if stored else None,
    }
    return SourceModel(kind="dcp", path=folder, tensors=specs, info=info, aliases=aliases, renamed=renamed,
                       trained_dtype=stored if stored and stored.itemsize == 2 else None)


def stored_dtype(specs: list[TensorSpec]) -> DType | None:
    """The one floating dtype all tensors are stored in, else None.

    FSDP keeps fp32 parameters under bf16 mixed precision, so fp32 says nothing about the training
    precision; 16-bit storage does (the model itself was cast).
    """
    seen = {s.dtype for s in specs if s.dtype.is_floating_point}
    return seen.pop() if len(seen) == 1 else None


__all__ = ["HF_ROOTS", "check_layout", "check_storage_files", "model_keys", "read_dcp", "stored_dtype", "tied_entries"]
