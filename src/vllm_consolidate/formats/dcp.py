"""The ``.metadata`` of a torch.distributed.checkpoint (DCP) folder, read without torch.

``dcp.save`` writes one pickled ``Metadata`` object and one or more ``.distcp`` files. For every
tensor of the (flattened) state dict the metadata lists its chunks (global offsets and sizes), and
for every chunk where it lies: a file name, a byte offset and a length. In the default
(``TORCH_SAVE``) format each chunk is a whole ``torch.save`` archive at that place in the file.

:func:`read_metadata` unpickles the metadata through an allowlist: its classes become inert records
(see :class:`~.torch_standins.Inert`) that are then checked field by field and turned into plain
:class:`DcpTensor` / :class:`DcpChunk` values. Nothing from the pickle is called.

Checked: every field's type; shapes and chunk bounds against the tensor's size; every chunk has
exactly one storage entry, at least as long as the chunk's elements; each storage file is one plain
name inside the folder; transforms (compression, encryption extensions) are refused; counts are
capped. Whether the chunks tile their tensor, and share no bytes, is checked by the reader
(``read.dcp``) for the tensors it takes, before any storage file is opened.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes, safe_io
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError
from vllm_consolidate.formats.torch_standins import Frozen
from vllm_consolidate.formats.torch_zip import MAX_DIMS, Allowlist, DTypeToken, Inert, is_index, load_pickle
from vllm_consolidate.limits import brief

METADATA_FILE = ".metadata"
#: A 70B model with its optimizer state at world size 1024 has ~2.5 M chunks: about 200 MB of pickle.
MAX_METADATA_BYTES = 256 * 2**20
#: State-dict entries and chunks per tensor; far above any real checkpoint.
MAX_ENTRIES = 4_000_000
MAX_CHUNKS_PER_TENSOR = 1 << 16

_MD = "torch.distributed.checkpoint.metadata"
_PLANNER = "torch.distributed.checkpoint.planner"


class Dims(Frozen):
    """What a ``.metadata`` pickle gets for ``torch.Size(...)``: checked sizes, hashed by identity.

    Not a tuple: the metadata is protocol 4, whose STACK_GLOBAL hides names from the pre-pass, so
    every object it can build must be harmless as a dict key (see ``Allowlist.identity_only``).
    """

    __slots__ = ("values",)
    _what = "size"
    values: tuple[int, ...]

    def __init__(self, values: tuple[int, ...]):
        self._init(values=values)


def _size(unpickler: Any, *args: Any) -> Dims:
    dims = args[0] if len(args) == 1 else None if args else ()
    if type(dims) not in (tuple, list) or len(dims) > MAX_DIMS or not all(is_index(d) for d in dims):
        raise CorruptCheckpointError(f"impossible torch.Size({brief(dims)})")
    return Dims(tuple(dims))


ALLOW = Allowlist(identity_only=True, calls={("torch", "Size"): _size}, inert=frozenset({
    (_MD, "Metadata"), (_MD, "TensorStorageMetadata"), (_MD, "BytesStorageMetadata"),
    (_MD, "TensorProperties"), (_MD, "ChunkStorageMetadata"), (_MD, "MetadataIndex"), (_MD, "StorageMeta"),
    (_MD, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    # Megatron-Core's torch_dist keeps its save plans in the metadata (to reuse them on the next save): inert.
    *((_PLANNER, name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    ("torch.serialization", "_get_layout"),
    ("torch", "device"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"),
}))


@dataclass(frozen=True)
class DcpChunk:
    """One stored piece of a tensor: its place in the full tensor and where its archive lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    """A tensor of the checkpoint's flattened state dict."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]


@dataclass
class DcpMetadata:
    """What ``.metadata`` says.

    Attributes:
        path: The ``.metadata`` file.
        tensors: Tensor entries by flattened key, in file order.
        byte_keys: Keys of non-tensor entries (pickled Python values: steps, schedulers).
        byte_storage: ``{byte key: (file, offset, length)}``: where each non-tensor entry lies (its bytes as saved;
            a ``torch.save`` archive for Megatron-Core's objects), for the entries the metadata places.
        paths: ``{flattened key: original nested path}`` from the save planner, when recorded.
        version: The DCP format version, if recorded.
    """

    path: Path
    tensors: dict[str, DcpTensor] = field(default_factory=dict)
    byte_keys: list[str] = field(default_factory=list)
    byte_storage: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    paths: dict[str, tuple[str, ...]] = field(default_factory=dict)
    version: str | None = None

    @property
    def files(self) -> list[str]:
        """Every storage file a tensor chunk lives in, sorted."""
        return sorted({c.file for t in self.tensors.values() for c in t.chunks})


def is_dcp_folder(path: Path) -> bool:
    """True if ``path`` holds an entry named ``.metadata``.

    Any entry counts (a FIFO, a dangling link): reading it then refuses it with an error naming it,
    rather than detection silently falling back to an older save.
    """
    return os.path.lexists(path / METADATA_FILE) and not (path / METADATA_FILE).is_dir()


class _Fields:
    """Typed access to an inert record's fields, with errors naming the metadata file."""

    def __init__(self, path: Path):
        self.path = path

    def bad(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"malformed DCP metadata: {what}", path=self.path)

    def state(self, obj: Any, cls: str) -> Any:
        # Inert classes exist only for allowlisted globals, so the class name identifies the record.
        if not (isinstance(obj, Inert) and obj.qualname.rsplit(".", 1)[-1] == cls):
            raise self.bad(f"expected a {cls}, found {brief(obj)}")
        return obj.state

    def record(self, obj: Any, cls: str) -> dict[str, Any]:
        state = self.state(obj, cls)
        if type(state) is tuple and len(state) == 2 and state[0] is None and type(state[1]) is dict:
            state = state[1]  # (dict state, slot state) of a slotted dataclass
        if type(state) is not dict or not all(type(k) is str for k in state):
            raise self.bad(f"{cls} fields are {brief(state)}")
        return state

    def dims(self, value: Any, what: str) -> tuple[int, ...]:
        if type(value) is Dims:
            return value.values
        if type(value) not in (tuple, list) or len(value) > MAX_DIMS or not all(is_index(v) for v in value):
            raise self.bad(f"{what} {brief(value)} is not a list of sizes")
        return tuple(value)


def _dtype(f: _Fields, props: Any, key: str) -> DType:
    state = f.state(props, "TensorProperties")
    token = state[0] if type(state) is tuple and state else state.get("dtype") if type(state) is dict else None
    if type(token) is not DTypeToken:
        raise f.bad(f"tensor {brief(key)} has no dtype")
    return dtypes.BY_NAME[token.name]


def _chunks(f: _Fields, key: str, shape: tuple[int, ...], raw: Any) -> list[tuple[int, ...]]:
    if type(raw) is not list or not 0 < len(raw) <= MAX_CHUNKS_PER_TENSOR:
        raise f.bad(f"tensor {brief(key)} lists {brief(raw)} as its chunks")
    out = []
    for chunk in raw:
        fields = f.record(chunk, "ChunkStorageMetadata")
        offsets = f.dims(fields.get("offsets"), "chunk offsets")
        sizes = f.dims(fields.get("sizes"), "chunk sizes")
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise f.bad(f"a chunk of {brief(key)} (offsets {offsets}, sizes {sizes}) does not fit its shape {shape}")
        out.append(offsets + sizes)
    return out


def _storage_index(f: _Fields, folder: Path, storage_data: Any) -> dict[tuple[str, tuple[int, ...]], tuple]:
    if type(storage_data) is not dict or len(storage_data) > MAX_ENTRIES:
        raise f.bad("storage_data is missing or not a mapping")
    index: dict[tuple[str, tuple[int, ...]], tuple] = {}
    for raw_key, raw_info in storage_data.items():
        key = f.record(raw_key, "MetadataIndex")
        fqn, offset = key.get("fqn"), key.get("offset")
        if type(fqn) is not str:
            raise f.bad(f"a storage entry names {brief(fqn)}")
        offset = f.dims(offset if offset is not None else (), "storage offset")
        info = f.record(raw_info, "_StorageInfo")
        name, start, length = info.get("relative_path"), info.get("offset"), info.get("length")
        if info.get("transform_descriptors"):
            raise UnsupportedCheckpointError(
                f"tensor {brief(fqn)} is stored with transforms {brief(info['transform_descriptors'])} "
                "(a DCP storage extension such as compression), which is not supported", path=f.path,
                hint="Save the checkpoint without storage extensions, or convert it with torch's dcp_to_torch_save.")
        if type(name) is not str or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise f.bad(f"tensor {brief(fqn)} is stored in {brief(name)}, which is not a file name in the folder")
        if not (is_index(start) and is_index(length)):
            raise f.bad(f"tensor {brief(fqn)} has storage offset {brief(start)} and length {brief(length)}")
        if (fqn, offset) in index:
            raise f.bad(f"two storage entries for the chunk of {brief(fqn)} at {offset}")
        index[fqn, offset] = (name, start, length)
    return index


def _planner_paths(raw: Any) -> dict[str, tuple[str, ...]]:
    """The planner's ``{flat key: nested path}``; empty when absent or not plain strings."""
    if type(raw) is not dict:
        return {}
    out = {}
    for key, value in raw.items():
        if type(key) is str and type(value) in (tuple, list) and value and all(type(v) in (str, int) for v in value):
            out[key] = tuple(str(v) for v in value)
    return out


def read_metadata(folder: Path) -> DcpMetadata:
    """Read and check the ``.metadata`` of a DCP folder, without torch and without running its pickle.

    Raises:
        UnsafePickleError: The pickle names a class outside the allowlist.
        LimitExceededError: The file or its pickle passes a cap (a CorruptCheckpointError).
        CorruptCheckpointError: The metadata is malformed or inconsistent.
        UnsupportedCheckpointError: Chunks are stored with transforms (storage extensions).
    """
    path = folder / METADATA_FILE
    data = safe_io.read_bounded(path, MAX_METADATA_BYTES, what="DCP .metadata")
    root = load_pickle(data, path, ALLOW)
    f = _Fields(path)
    top = f.record(root, "Metadata")
    entries = top.get("state_dict_metadata")
    if type(entries) is not dict or len(entries) > MAX_ENTRIES:
        raise f.bad("state_dict_metadata is missing or not a mapping")
    index = _storage_index(f, folder, top.get("storage_data"))
    version = top.get("version")
    meta = DcpMetadata(path, version=version if type(version) is str else None, paths=_planner_paths(
        top.get("planner_data")))
    for key, entry in entries.items():
        if type(key) is not str:
            raise f.bad(f"a state-dict key is {brief(key)}")
        if isinstance(entry, Inert) and entry.qualname.endswith("BytesStorageMetadata"):
            meta.byte_keys.append(key)
            if (where := index.get((key, ()))) is not None:
                meta.byte_storage[key] = where
            continue
        fields = f.record(entry, "TensorStorageMetadata")
        shape = f.dims(fields.get("size"), f"size of {brief(key)}")
        dtype = _dtype(f, fields.get("properties"), key)
        chunks = []
        for bounds in _chunks(f, key, shape, fields.get("chunks")):
            offsets, sizes = bounds[: len(shape)], bounds[len(shape):]
            where = index.get((key, offsets))
            if where is None:
                raise f.bad(f"the chunk of {brief(key)} at {offsets} has no storage entry")
            # Its archive holds its elements and more (zip headers): a shorter entry cannot be real,
            # and with no two entries sharing bytes (read.dcp) this ties the work to the files' size.
            if where[2] < math.prod(sizes) * dtype.itemsize:
                raise f.bad(f"the chunk of {brief(key)} at {offsets} is stored in {where[2]:,} bytes, fewer than its "
                            f"{math.prod(sizes) * dtype.itemsize:,} bytes of {dtype}")
            chunks.append(DcpChunk(offsets, sizes, *where))
        if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape):
            raise f.bad(f"the chunks of {brief(key)} do not add up to its shape {shape}")
        meta.tensors[key] = DcpTensor(key, dtype, shape, tuple(chunks))
    return meta


__all__ = ["ALLOW", "METADATA_FILE", "DcpChunk", "DcpMetadata", "DcpTensor", "is_dcp_folder", "read_metadata"]
