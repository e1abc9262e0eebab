"""Reader for Hugging Face model folders: sharded or single safetensors / PyTorch ``.bin`` weights.

Layouts read (the first that is present wins, in the order ``transformers.from_pretrained`` uses):

1. ``model.safetensors`` (``hf_single``);
2. ``model.safetensors.index.json`` + ``model-0000i-of-0000N.safetensors`` (``hf_sharded``);
3. ``pytorch_model.bin`` as a file (``hf_single``);
4. ``pytorch_model.bin.index.json`` + ``pytorch_model-0000i-of-0000N.bin`` (``hf_sharded``);
5. a FOLDER named ``pytorch_model.bin/`` holding any of 1-4 (see below).

Nothing is loaded. A safetensors file is described from its header alone (the 8-byte little-endian
length and the JSON after it; a tensor's bytes are ``8 + header_len + data_offsets``). A ``.bin``
file is read with :func:`~vllm_consolidate.formats.torch_zip.load_lazy`, whose allowlist admits
only containers, tensors and dtypes; the unpickled object must then be a flat ``{name: tensor}``
dict, and anything else in it (optimizer state, Namespace, numpy scalars) is refused. Memory is
bounded by the headers and pickles, never by the tensors.

Untrusted input: every weight file (index, shards, single file) must be a regular file (a FIFO is
refused, never opened blocking) and, symlinks resolved, lie inside the folder the user named (for
an HF-cache snapshot, its ``models--*`` folder); a link out is an :class:`UnsafeInputError` naming
it. An index is read with a size cap (``safe_io.MAX_INDEX_BYTES``), strictly (no duplicate keys,
no non-finite numbers), and may name only plain file names in its folder. Safetensors headers are
checked as :mod:`.safetensors_header` describes; ``.bin`` shapes by :mod:`.limits`.

Checks on a sharded folder (each failure is a :class:`CorruptCheckpointError` naming the file and
the tensor): every file the index names exists; every tensor is in the file the index says and
every tensor of a shard is in the index; no tensor is stored twice across shards; no shard file of
the index's format lies in the folder without being listed in the index.

Names: the wrapper prefixes ``module.`` (DDP, DeepSpeed engine), ``_orig_mod.`` (``torch.compile``)
and ``_forward_module.`` (Lightning Fabric) are stripped from the front of each name, repeatedly
and in any combination; :attr:`SourceModel.renamed` records ``{old: new}``. Two names that become
one are an error. In a ``.bin``, names that are the same view of one storage (tied
``lm_head.weight``) become :attr:`SourceModel.aliases` of the first name.

ZeRO-3 placeholders: a model saved with ``save_pretrained`` under ZeRO-3 without gathering holds
empty (numel 0) tensors in place of the weights. When at least half of the tensors are empty we
refuse with :class:`UnsupportedCheckpointError` and point at the DeepSpeed ``global_stepN`` folder.

The nested ``pytorch_model.bin/`` folder, decided from what real tools write:

* DeepSpeed >= 0.14 changed ``zero_to_fp32.py``'s second argument from an output FILE to an output
  FOLDER (``python zero_to_fp32.py CHECKPOINT_DIR OUTPUT_DIR [--safe_serialization]
  [--max_shard_size 5GB]``). The old, still widely copied command ``python zero_to_fp32.py .
  pytorch_model.bin`` therefore now creates a folder ``pytorch_model.bin/`` holding
  ``pytorch_model.bin`` (or ``model.safetensors``), or ``pytorch_model-0000i-of-0000N.bin`` shards +
  ``pytorch_model.bin.index.json`` (or the safetensors equivalent) when the model exceeds the
  shard size. Its tensors are plain ``torch.save``'d fp32 state dicts (shared parameters share
  storage). This is the "nested shards in pytorch_model.bin/" layout: it is SUPPORTED, with the
  same checks as a top-level folder. Config and tokenizer are looked for in the nested folder and
  then in the folder around it (the ``checkpoint-N`` folder the script was run in).
* ``torch.distributed.checkpoint`` (DCP; e.g. FSDP ``SHARDED_STATE_DICT`` via Accelerate) writes a
  folder with ``.metadata`` and ``__R_0.distcp`` files. Its metadata is a pickle of DCP classes
  and its tensors may be split into chunks per rank; it is NOT supported. Such a folder (whatever
  its name, ``pytorch_model.bin/`` included) gives an :class:`UnsupportedCheckpointError` that
  names the ``.metadata`` file and says how to convert it with torch's own
  ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``.
* A ``pytorch_model.bin/`` folder holding anything else is refused with an error listing what it
  holds. Only one level of nesting is followed.

Top-level weight files, when present, win over a nested folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.errors import CorruptCheckpointError, UnsafeInputError, UnsupportedCheckpointError
from vllm_consolidate.formats.safetensors import (  # re-exported: validate and compare import them from here
    MAX_HEADER_BYTES,
    SAFETENSORS_TO_TORCH,
    StoredTensor,
    stored_safetensors,
)
from vllm_consolidate.formats.torch_zip import TensorRef, load_lazy
from vllm_consolidate.limits import brief, checked_shape
from vllm_consolidate.read.hf_layout import (  # re-exported: detection and batch import them from here
    BIN_INDEX,
    BIN_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    SHARD_RE,
    WEIGHT_FILES,
    Layout,
    find_layout,
    is_hf_folder,
)
from vllm_consolidate.read.registry import HF_SHARDED as SHARDED
from vllm_consolidate.read.registry import HF_SINGLE as SINGLE
from vllm_consolidate.safe_io import MAX_INDEX_BYTES, confined, open_source, read_json, trust_root
from vllm_consolidate.source import SourceModel, TensorSpec

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")

_FIX_INDEX_HINT = "Fix or regenerate the index (re-save with save_pretrained), or copy the folder again."


# -- per-file metadata ----------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> list[tuple[str, TensorSpec]]:
    """Describe every tensor of a safetensors file from its header, in on-disk order.

    Args:
        path: The file.

    Returns:
        ``(name, spec)`` pairs; each spec has one segment (none when the tensor is empty).

    Raises:
        CorruptCheckpointError: The header is truncated, malformed or points outside the file.
        UnsupportedCheckpointError: A tensor has a dtype torch cannot hold.
    """
    out: list[tuple[str, TensorSpec]] = []
    for t in sorted(stored_safetensors(path), key=lambda t: t.offset):
        if t.dtype is None:
            raise UnsupportedCheckpointError(f"{brief(t.name)}: dtype {brief(t.dtype_code)} is not supported",
                                             path=path)
        out.append((t.name, TensorSpec(t.name, t.dtype, t.shape, t.segments)))
    return out


def read_flat_state_dict(path: Path) -> dict[str, TensorRef]:
    """Unpickle a ``torch.save``'d file through the allowlist and check it is a flat ``{name: tensor}`` dict.

    Raises:
        UnsafePickleError: The pickle names a global outside the allowlist.
        UnsupportedCheckpointError: The object is not a flat ``{name: tensor}`` dict.
        CorruptCheckpointError: The file is not a regular file, is truncated or inconsistent.
    """
    # load_lazy opens by name with a blocking open(): make sure a FIFO is refused before it gets there.
    open_source(path).close()
    obj: Any = load_lazy(path)
    if not isinstance(obj, dict):
        raise UnsupportedCheckpointError(
            f"expected a flat name -> tensor dict (a state dict), found a {type(obj).__name__}", path=path,
            hint="Save the model with model.state_dict() or save_pretrained.")
    bad = [(k, v) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, TensorRef)]
    if bad:
        name, value = bad[0]
        what = "a dict" if isinstance(value, dict) else type(value).__name__
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UnsupportedCheckpointError(
            f"entry '{brief(name)}' is {what}, not a tensor{more}: this is not a flat name -> tensor dict "
            "(a plain model state dict)",
            path=path,
            hint=(
                "A training checkpoint (optimizer, trainer state) is not a model file. Extract "
                "model.state_dict() and save it, or pass a DeepSpeed checkpoint with --type deepspeed."
            ),
        )
    for name, ref in obj.items():
        checked_shape(ref.shape, what=f"tensor {brief(name)}", path=path)
    return obj


def stored_bin(path: Path) -> list[StoredTensor]:
    """Every tensor of a flat ``torch.save``'d state dict, aliases included, in the file's order.

    Raises:
        The errors of :func:`read_flat_state_dict`.
    """
    out = []
    for name, ref in read_flat_state_dict(path).items():
        offset = ref.segment().offset if ref.is_contiguous() else -1
        out.append(StoredTensor(name, Path(path).name, ref.dtype, str(ref.dtype), tuple(ref.shape), os.fspath(path),
                                offset, ref.nbytes))
    return out


def _view_key(ref: TensorRef) -> tuple:
    return (ref.storage.key, ref.storage_offset, ref.shape, ref.stride, ref.dtype)


def read_bin_state_dict(path: Path) -> tuple[list[tuple[str, TensorSpec]], dict[str, str]]:
    """Describe a ``torch.save``'d flat state dict without loading it.

    Args:
        path: The ``.bin`` file.

    Returns:
        ``(name, spec)`` pairs in the file's order, without aliases; and ``{alias: target}`` for
        names that are the same view of one storage as an earlier name.

    Raises:
        UnsafePickleError: The pickle names a global outside the allowlist.
        UnsupportedCheckpointError: The object is not a flat ``{name: tensor}`` dict.
        CorruptCheckpointError: The file is truncated or inconsistent.
    """
    out: list[tuple[str, TensorSpec]] = []
    aliases: dict[str, str] = {}
    first_view: dict[tuple, str] = {}
    for name, value in read_flat_state_dict(path).items():
        key = _view_key(value)
        if value.numel and key in first_view:
            aliases[name] = first_view[key]
            continue
        first_view.setdefault(key, name)
        out.append((name, TensorSpec(name, value.dtype, value.shape, [value.segment()] if value.numel else [])))
    return out, aliases


def _read_file(path: Path, fmt: str) -> tuple[list[tuple[str, TensorSpec]], dict[str, str]]:
    if fmt == "safetensors":
        return read_safetensors_header(path), {}
    return read_bin_state_dict(path)


# -- index ----------------------------------------------------------------------------------------------


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an index, read bounded and strictly; every file it names is a plain name.

    Raises:
        CorruptCheckpointError: Unreadable, too large, not strict JSON, or no usable ``weight_map``.
        UnsafeInputError: A file name is a path (``/``, ``\\``, ``.``, ``..``, NUL): it could only lead
            out of the folder.
    """
    data = read_json(index, MAX_INDEX_BYTES, what=f"the index {index.name}", unique_keys=True)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError("the index has no 'weight_map'", path=index, hint=_FIX_INDEX_HINT)
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise CorruptCheckpointError(f"the index maps {brief(name)} to {brief(fname)}, not a file name",
                                         path=index, hint=_FIX_INDEX_HINT)
        if fname in (".", "..") or any(c in fname for c in "/\\\0"):
            raise UnsafeInputError(
                f"the index maps {brief(name)} to {brief(fname)}, which is not a plain file name in its folder; "
                "refusing to follow it", path=index, hint=_FIX_INDEX_HINT)
    return weight_map


def check_weight_file(path: Path, roots: list[Path]) -> None:
    """A weight file must lie, with symlinks resolved, inside the model's tree (see :func:`read_hf`)."""
    if not confined(path, roots):
        raise UnsafeInputError(
            f"weight file resolves to {os.path.realpath(path)}, outside the model folder "
            f"{', '.join(str(r) for r in roots)}; refusing to read it", path=path,
            hint="Copy the real file into the model folder (a link out of the input is never followed).")


def _read_sharded(layout: Layout, roots: list[Path],
                  ) -> tuple[list[tuple[str, TensorSpec]], dict[str, str], list[Path]]:
    """Read every shard the index lists and check the index against them."""
    assert layout.index is not None
    folder, index = layout.folder, layout.index
    check_weight_file(index, roots)
    weight_map = _read_index(index)
    listed: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        listed.setdefault(fname, []).append(name)
    files = sorted(listed)
    for fname in files:
        if not os.path.lexists(folder / fname):
            names = listed[fname]
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise CorruptCheckpointError(
                f"the index {index.name} puts {brief(names[0])}{more} in {brief(fname)}, but that file is missing",
                path=folder / fname,
                hint=f"Copy {brief(fname)} from where the other shards came from, or re-save the model.",
            )
        check_weight_file(folder / fname, roots)
    stray = sorted(p.name for p in folder.iterdir() if SHARD_RE[layout.fmt].match(p.name) and p.name not in listed)
    if stray:
        raise CorruptCheckpointError(
            f"shard {stray[0]} is in the folder but the index {index.name} does not list it",
            path=folder / stray[0],
            hint="Remove the stray shard (it may be left from another save), or fix the index to list it.",
        )
    where: dict[str, str] = {}
    out: list[tuple[str, TensorSpec]] = []
    aliases: dict[str, str] = {}
    for fname in files:
        tensors, file_aliases = _read_file(folder / fname, layout.fmt)
        for name in [n for n, _ in tensors] + list(file_aliases):
            if name in where:
                raise CorruptCheckpointError(
                    f"tensor {brief(name)} is stored twice: in {where[name]} and in {fname}",
                    path=folder / fname,
                    hint="Remove the duplicate shard or re-save the model; it is unclear which copy is right.",
                )
            where[name] = fname
            if name not in weight_map:
                raise CorruptCheckpointError(
                    f"tensor {brief(name)} is in {fname} but the index {index.name} does not list it",
                    path=folder / fname, hint=_FIX_INDEX_HINT)
            if weight_map[name] != fname:
                raise CorruptCheckpointError(
                    f"the index {index.name} says tensor {brief(name)} is in {brief(weight_map[name])}, "
                    f"but it is in {fname}",
                    path=folder / fname, hint=_FIX_INDEX_HINT)
        out.extend(tensors)
        aliases.update(file_aliases)
    for name, fname in weight_map.items():
        if name not in where:
            raise CorruptCheckpointError(
                f"the index {index.name} says tensor {brief(name)} is in {fname}, but {fname} does not hold it",
                path=folder / fname, hint=_FIX_INDEX_HINT)
    return out, aliases, [folder / f for f in files]


# -- names ----------------------------------------------------------------------------------------------


def strip_wrapper_prefixes(name: str) -> str:
    """Remove ``module.``, ``_orig_mod.`` and ``_forward_module.`` from the front, repeatedly."""
    # Advance an index instead of slicing each time: a forged name of a million prefixes stays linear.
    start, changed = 0, True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix, start) and len(name) - start > len(prefix):
                start += len(prefix)
                changed = True
    return name[start:]


def _rename(tensors: list[tuple[str, TensorSpec]], aliases: dict[str, str], where: Path,
            ) -> tuple[list[TensorSpec], dict[str, str], dict[str, str]]:
    renamed: dict[str, str] = {}
    owner: dict[str, str] = {}

    def new_name(old: str) -> str:
        new = strip_wrapper_prefixes(old)
        if new in owner:
            raise CorruptCheckpointError(
                f"tensors {brief(owner[new])} and {brief(old)} both become {brief(new)} once wrapper prefixes "
                "are stripped",
                path=where,
                hint="Save the unwrapped model's state dict (e.g. model.module.state_dict()), which has one of each.",
            )
        owner[new] = old
        if new != old:
            renamed[old] = new
        return new

    specs = []
    for old, spec in tensors:
        spec.name = new_name(old)
        specs.append(spec)
    new_aliases = {new_name(alias): strip_wrapper_prefixes(target) for alias, target in aliases.items()}
    return specs, new_aliases, renamed


# -- entry point ----------------------------------------------------------------------------------------


def _check_placeholders(tensors: list[TensorSpec], path: Path) -> None:
    empty = [t.name for t in tensors if t.numel == 0]
    if tensors and len(empty) * 2 >= len(tensors):
        raise UnsupportedCheckpointError(
            f"{len(empty)} of {len(tensors)} tensors are empty (e.g. {brief(empty[0])}): these are ZeRO-3 placeholders "
            "saved without gathering the weights, not a model",
            path=path,
            hint=(
                "Convert the DeepSpeed checkpoint instead: pass the checkpoint-N (or its global_stepN) folder with "
                "--type deepspeed. To get real HF weights from training, set "
                "stage3_gather_16bit_weights_on_model_save: true."
            ),
        )


def read_hf(folder: Path, root: Path | None = None) -> SourceModel:
    """Describe an HF model folder's weights from metadata only, checking shards against the index.

    Every weight file (index, shards, single file) must be a regular file and, with symlinks resolved,
    lie inside the trust root of ``root``: that folder itself, or for a snapshot in the HF cache its
    ``models--*`` folder, whose snapshots link into ``blobs/`` (see :func:`safe_io.trust_root`).

    Args:
        folder: The folder holding the weights (or a nested ``pytorch_model.bin/`` folder).
        root: The folder the user named, which the weights must not leave (default: ``folder``).

    Returns:
        A :class:`SourceModel` of kind ``"hf_sharded"`` or ``"hf_single"``.

    Raises:
        CorruptCheckpointError: Truncated files, or an index that does not match the shards.
        UnsupportedCheckpointError: DCP folders, non-state-dict pickles, ZeRO-3 placeholders.
        UnsafePickleError: A ``.bin`` pickle asks for a global outside the allowlist.
        UnsafeInputError: A weight file resolves outside the model folder.
    """
    folder = Path(folder)
    roots = [trust_root(root if root is not None else folder)]
    layout = find_layout(folder)
    if layout.index is not None:
        raw, aliases, files = _read_sharded(layout, roots)
        kind, where = SHARDED, layout.index
    else:
        check_weight_file(layout.files[0], roots)
        raw, aliases = _read_file(layout.files[0], layout.fmt)
        files, kind, where = layout.files, SINGLE, layout.files[0]
    if not raw:
        raise CorruptCheckpointError("the weights hold no tensors", path=where,
                                     hint="Re-save the model; this file is empty.")
    tensors, aliases, renamed = _rename(raw, aliases, where)
    _check_placeholders(tensors, where)
    asset_dirs = [layout.folder] + ([folder] if layout.nested else [])
    info: dict[str, Any] = {"type": kind, "format": layout.fmt, "files": len(files)}
    if layout.nested:
        info["nested"] = f"{BIN_SINGLE}/ folder (DeepSpeed zero_to_fp32.py output)"
    return SourceModel(
        kind=kind,
        path=layout.folder,
        tensors=tensors,
        asset_dirs=asset_dirs,
        trained_dtype=dtypes.dominant((t.dtype, t.nbytes) for t in tensors),
        info=info,
        aliases=aliases,
        renamed=renamed,
    )


__all__ = [
    "BIN_INDEX", "BIN_SINGLE", "MAX_HEADER_BYTES", "SAFETENSORS_TO_TORCH", "SAFE_INDEX", "SAFE_SINGLE", "SHARDED",
    "SINGLE", "StoredTensor", "WEIGHT_FILES", "is_hf_folder", "read_bin_state_dict", "read_flat_state_dict", "read_hf",
    "read_safetensors_header",
    "stored_bin", "stored_safetensors", "strip_wrapper_prefixes",
]
