"""Reader for Hugging Face model folders: sharded or single safetensors / PyTorch ``.bin`` weights.

Layouts read (the first that is present wins, in the order ``transformers.from_pretrained`` uses):

1. ``model.safetensors`` (``hf_single``);
2. ``model.safetensors.index.json`` + ``model-0000i-of-0000N.safetensors`` (``hf_sharded``);
3. ``pytorch_model.bin`` as a file (``hf_single``);
4. ``pytorch_model.bin.index.json`` + ``pytorch_model-0000i-of-0000N.bin`` (``hf_sharded``);
5. a FOLDER named ``pytorch_model.bin/`` holding any of 1-4 (see below).

Nothing is loaded. A safetensors file is described from its header alone (the 8-byte little-endian
length and the JSON after it; a tensor's bytes are ``8 + header_len + data_offsets``). A ``.bin``
file is read with :func:`~vllm_consolidate.readers.torch_zip.load_lazy`, whose allowlist admits
only containers, tensors and dtypes; the unpickled object must then be a flat ``{name: tensor}``
dict, and anything else in it (optimizer state, Namespace, numpy scalars) is refused. Memory is
bounded by the headers and pickles, never by the tensors.

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

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError
from vllm_consolidate.readers.torch_zip import TensorRef, load_lazy
from vllm_consolidate.source import Segment, SourceModel, TensorSpec

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)

_SHARD_RE = {
    "safetensors": re.compile(r"^model-\d+-of-\d+\.safetensors$"),
    "bin": re.compile(r"^pytorch_model-\d+-of-\d+\.bin$"),
}
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")

#: safetensors dtype strings (as in the safetensors spec) -> torch dtypes: the inverse of the planner's table.
SAFETENSORS_TO_TORCH: dict[str, DType] = dict(dtypes.BY_SAFETENSORS)

_MAX_HEADER = 100 * 2**20  # safetensors itself refuses headers above 100 MB
_FIX_INDEX_HINT = "Fix or regenerate the index (re-save with save_pretrained), or copy the folder again."


@dataclass
class _Layout:
    """Which weight files of a folder are read."""

    folder: Path
    fmt: str  # "safetensors" or "bin"
    files: list[Path]
    index: Path | None
    nested: bool = False


# -- detection ------------------------------------------------------------------------------------------


def _is_dcp_folder(path: Path) -> bool:
    return (path / ".metadata").is_file() and any(path.glob("*.distcp"))


def _has_weights(path: Path) -> bool:
    if any((path / n).is_file() for n in WEIGHT_FILES):
        return True
    try:
        return any(rx.match(p.name) for p in path.iterdir() for rx in _SHARD_RE.values())
    except OSError:
        return False


def is_hf_folder(path: Path) -> bool:
    """True if the folder holds HF weights, a nested ``pytorch_model.bin/`` folder, or a DCP folder.

    DCP folders count so that reading them gives a clear "unsupported" error instead of "not found".
    """
    path = Path(path)
    if not path.is_dir():
        return False
    return _has_weights(path) or (path / BIN_SINGLE).is_dir() or _is_dcp_folder(path)


def _dcp_error(folder: Path) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        "this is a torch.distributed.checkpoint (DCP) folder (.metadata + *.distcp files), which is not supported",
        path=folder / ".metadata",
        hint=(
            "Convert it to one file first with torch: python -c \"from torch.distributed.checkpoint.format_utils "
            f"import dcp_to_torch_save; dcp_to_torch_save('{folder}', 'OUT/pytorch_model.bin')\", put config.json "
            "next to it and pass OUT (only if you trust the checkpoint: that step unpickles it)."
        ),
    )


def _layout(folder: Path, *, nested: bool = False) -> _Layout:
    if (folder / SAFE_SINGLE).is_file():
        return _Layout(folder, "safetensors", [folder / SAFE_SINGLE], None, nested)
    if (folder / SAFE_INDEX).is_file():
        return _Layout(folder, "safetensors", [], folder / SAFE_INDEX, nested)
    if (folder / BIN_SINGLE).is_file():
        return _Layout(folder, "bin", [folder / BIN_SINGLE], None, nested)
    if (folder / BIN_INDEX).is_file():
        return _Layout(folder, "bin", [], folder / BIN_INDEX, nested)
    for fmt, index_name in (("safetensors", SAFE_INDEX), ("bin", BIN_INDEX)):
        shards = sorted(p for p in folder.iterdir() if _SHARD_RE[fmt].match(p.name))
        if shards:
            raise CorruptCheckpointError(
                f"{shards[0].name} and {len(shards) - 1} more shard files are here but their index "
                f"{index_name} is missing",
                path=folder / index_name,
                hint=f"Copy {index_name} from where the shards came from; without it the shards cannot be trusted.",
            )
    if _is_dcp_folder(folder):
        raise _dcp_error(folder)
    inner = folder / BIN_SINGLE
    if inner.is_dir() and not nested:
        if _is_dcp_folder(inner):
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
        return _layout(inner, nested=True)
    raise UnsupportedCheckpointError(
        f"no HF weights here: expected one of {', '.join(WEIGHT_FILES)}",
        path=folder,
        hint="Pass the folder that holds the model's weights.",
    )


# -- per-file metadata ----------------------------------------------------------------------------------


@dataclass
class StoredTensor:
    """A tensor as a weight file stores it, located but not read.

    Attributes:
        name: Its key in the file.
        file: The file name.
        dtype: The torch dtype, or None for a dtype this tool cannot read.
        dtype_code: The dtype as the file spells it (``F32``, ``torch.float32``).
        shape: Its shape.
        path: The file's path.
        offset: Absolute offset of its first byte, or -1 when it is not one contiguous range.
        nbytes: Its size in bytes.
    """

    name: str
    file: str
    dtype: DType | None
    dtype_code: str
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def segments(self) -> list[Segment]:
        """Its bytes as one segment; none when it is empty or not one contiguous range."""
        return [Segment(self.path, self.offset, self.nbytes)] if self.nbytes and self.offset >= 0 else []


def stored_safetensors(path: Path) -> list[StoredTensor]:
    """Every tensor of a safetensors file, in header order, from the header alone.

    A dtype code not in :data:`SAFETENSORS_TO_TORCH` gives ``dtype=None`` (its byte range is still
    checked against the file); the caller decides whether that is an error.

    Raises:
        CorruptCheckpointError: The header is truncated, malformed or points outside the file.
    """
    spath = os.fspath(path)
    try:
        size = os.path.getsize(spath)
        with open(spath, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise CorruptCheckpointError("file is shorter than a safetensors header; it is truncated", path=path)
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise CorruptCheckpointError(
                    f"safetensors header length {hlen} does not fit the {size}-byte file; it is truncated or "
                    "not a safetensors file", path=path)
            raw = fh.read(hlen)
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read file: {exc.strerror or exc}", path=path) from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"safetensors header is not valid JSON ({exc})", path=path) from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError("safetensors header is not a JSON object", path=path)
    data_start = 8 + hlen
    data_size = size - data_start
    out: list[StoredTensor] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = str(meta["dtype"]), tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{name}: malformed header entry {meta!r:.120}", path=path) from exc
        dtype = SAFETENSORS_TO_TORCH.get(code)
        nbytes = end - begin if dtype is None else math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise CorruptCheckpointError(
                f"{name}: data_offsets [{begin}, {end}) do not hold {nbytes} bytes inside the file's "
                f"{data_size} data bytes; the file is truncated or damaged", path=path)
        out.append(StoredTensor(name, Path(spath).name, dtype, code, shape, spath, data_start + begin, nbytes))
    return out


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
            raise UnsupportedCheckpointError(f"{t.name}: dtype {t.dtype_code} is not supported", path=path)
        out.append((t.name, TensorSpec(t.name, t.dtype, t.shape, t.segments)))
    return out


def read_flat_state_dict(path: Path) -> dict[str, TensorRef]:
    """Unpickle a ``torch.save``'d file through the allowlist and check it is a flat ``{name: tensor}`` dict.

    Raises:
        UnsafePickleError: The pickle names a global outside the allowlist.
        UnsupportedCheckpointError: The object is not a flat ``{name: tensor}`` dict.
        CorruptCheckpointError: The file is truncated or inconsistent.
    """
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
            f"entry {name!r} is {what}, not a tensor{more}: this is not a flat name -> tensor dict (a plain model "
            "state dict)",
            path=path,
            hint=(
                "A training checkpoint (optimizer, trainer state) is not a model file. Extract "
                "model.state_dict() and save it, or pass a DeepSpeed checkpoint with --type deepspeed."
            ),
        )
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
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"cannot read the index ({exc})", path=index, hint=_FIX_INDEX_HINT) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError("the index has no 'weight_map'", path=index, hint=_FIX_INDEX_HINT)
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise CorruptCheckpointError(f"the index maps {name} to the invalid file name {fname!r}", path=index,
                                         hint=_FIX_INDEX_HINT)
    return weight_map


def _read_sharded(layout: _Layout) -> tuple[list[tuple[str, TensorSpec]], dict[str, str], list[Path]]:
    """Read every shard the index lists and check the index against them."""
    assert layout.index is not None
    folder, index = layout.folder, layout.index
    weight_map = _read_index(index)
    listed: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        listed.setdefault(fname, []).append(name)
    files = sorted(listed)
    for fname in files:
        if not (folder / fname).is_file():
            names = listed[fname]
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise CorruptCheckpointError(
                f"the index {index.name} puts {names[0]}{more} in {fname}, but that file is missing",
                path=folder / fname,
                hint=f"Copy {fname} from where the other shards came from, or re-save the model.",
            )
    stray = sorted(p.name for p in folder.iterdir() if _SHARD_RE[layout.fmt].match(p.name) and p.name not in listed)
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
                    f"tensor {name} is stored twice: in {where[name]} and in {fname}",
                    path=folder / fname,
                    hint="Remove the duplicate shard or re-save the model; it is unclear which copy is right.",
                )
            where[name] = fname
            if name not in weight_map:
                raise CorruptCheckpointError(
                    f"tensor {name} is in {fname} but the index {index.name} does not list it",
                    path=folder / fname, hint=_FIX_INDEX_HINT)
            if weight_map[name] != fname:
                raise CorruptCheckpointError(
                    f"the index {index.name} says tensor {name} is in {weight_map[name]}, but it is in {fname}",
                    path=folder / fname, hint=_FIX_INDEX_HINT)
        out.extend(tensors)
        aliases.update(file_aliases)
    for name, fname in weight_map.items():
        if name not in where:
            raise CorruptCheckpointError(
                f"the index {index.name} says tensor {name} is in {fname}, but {fname} does not hold it",
                path=folder / fname, hint=_FIX_INDEX_HINT)
    return out, aliases, [folder / f for f in files]


# -- names ----------------------------------------------------------------------------------------------


def strip_wrapper_prefixes(name: str) -> str:
    """Remove ``module.``, ``_orig_mod.`` and ``_forward_module.`` from the front, repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix):]
                changed = True
    return name


def _rename(tensors: list[tuple[str, TensorSpec]], aliases: dict[str, str], where: Path,
            ) -> tuple[list[TensorSpec], dict[str, str], dict[str, str]]:
    renamed: dict[str, str] = {}
    owner: dict[str, str] = {}

    def new_name(old: str) -> str:
        new = strip_wrapper_prefixes(old)
        if new in owner:
            raise CorruptCheckpointError(
                f"tensors {owner[new]} and {old} both become {new} once wrapper prefixes are stripped",
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


def _dominant_float(tensors: list[TensorSpec]) -> DType | None:
    weight: dict[DType, int] = {}
    for t in tensors:
        if t.dtype.is_floating_point:
            weight[t.dtype] = weight.get(t.dtype, 0) + t.nbytes
    return max(weight, key=weight.__getitem__) if weight else None


def _check_placeholders(tensors: list[TensorSpec], path: Path) -> None:
    empty = [t.name for t in tensors if t.numel == 0]
    if tensors and len(empty) * 2 >= len(tensors):
        raise UnsupportedCheckpointError(
            f"{len(empty)} of {len(tensors)} tensors are empty (e.g. {empty[0]}): these are ZeRO-3 placeholders "
            "saved without gathering the weights, not a model",
            path=path,
            hint=(
                "Convert the DeepSpeed checkpoint instead: pass the checkpoint-N (or its global_stepN) folder with "
                "--type deepspeed. To get real HF weights from training, set "
                "stage3_gather_16bit_weights_on_model_save: true."
            ),
        )


def read_hf(folder: Path) -> SourceModel:
    """Describe an HF model folder's weights from metadata only, checking shards against the index.

    Args:
        folder: The folder holding the weights (or a nested ``pytorch_model.bin/`` folder).

    Returns:
        A :class:`SourceModel` of kind ``"hf_sharded"`` or ``"hf_single"``.

    Raises:
        CorruptCheckpointError: Truncated files, or an index that does not match the shards.
        UnsupportedCheckpointError: DCP folders, non-state-dict pickles, ZeRO-3 placeholders.
        UnsafePickleError: A ``.bin`` pickle asks for a global outside the allowlist.
    """
    folder = Path(folder)
    layout = _layout(folder)
    if layout.index is not None:
        raw, aliases, files = _read_sharded(layout)
        kind, where = "hf_sharded", layout.index
    else:
        raw, aliases = _read_file(layout.files[0], layout.fmt)
        files, kind, where = layout.files, "hf_single", layout.files[0]
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
        trained_dtype=_dominant_float(tensors),
        info=info,
        aliases=aliases,
        renamed=renamed,
    )
