"""Lazy, allowlisted reader for files written by ``torch.save`` (the zip format).

The pickle inside a ``torch.save`` file describes the objects; each tensor's bytes live in a separate,
uncompressed zip member. :func:`load_lazy` unpickles only the description, through an allowlist, and
turns every tensor into a :class:`TensorRef` that knows where its bytes lie in the file. No tensor
data is read, so Adam moments in a 10 GB optimizer file cost nothing; callers read only the byte
ranges they need (see ``vllm_consolidate.io``).

Safety: ``find_class`` admits plain containers, torch's tensor and storage rebuild functions, dtypes
and a few harmless torch/stdlib types. Globals from the ``deepspeed`` package (loss scalers, the ZeRO
stage enum, config objects) become inert :class:`Inert` stand-ins: they record their arguments and
never run DeepSpeed code, so DeepSpeed need not be installed. Any other global is refused with
:class:`~vllm_consolidate.errors.UnsafePickleError` naming it, before anything it asks for runs.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import CorruptCheckpointError, UnsafePickleError, UnsupportedCheckpointError
from vllm_consolidate.source import Segment


@dataclass(frozen=True)
class StorageRef:
    """A storage inside a torch zip file: where its bytes are, and their element dtype."""

    path: str
    key: str
    dtype: DType
    numel: int
    offset: int  # absolute byte offset of the storage's first byte in the file

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


@dataclass
class TensorRef:
    """A tensor described by a pickle but not loaded: a view into a :class:`StorageRef`."""

    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: DType = field(init=False)

    def __post_init__(self) -> None:
        self.dtype = self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def segment(self, start: int = 0, count: int | None = None) -> Segment:
        """The bytes of elements ``[start, start+count)`` of this contiguous tensor's flat view."""
        if not self.is_contiguous():
            raise UnsupportedCheckpointError(
                f"tensor with shape {self.shape} and stride {self.stride} is not contiguous",
                path=self.storage.path,
                hint="Re-save the model with contiguous tensors (save_pretrained does this).",
            )
        count = self.numel - start if count is None else count
        first = self.storage_offset + start
        if first + count > self.storage.numel:
            raise CorruptCheckpointError(
                f"tensor reaches past the end of its storage {self.storage.key}", path=self.storage.path
            )
        size = self.dtype.itemsize
        return Segment(self.storage.path, self.storage.offset + first * size, count * size)


class Inert:
    """Stand-in for a DeepSpeed class found in a checkpoint. It stores what it is given and does nothing."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return type(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


_INERT_CLASSES: dict[str, type[Inert]] = {}


def _inert(module: str, name: str) -> type[Inert]:
    qualname = f"{module}.{name}"
    if qualname not in _INERT_CLASSES:
        _INERT_CLASSES[qualname] = type(name, (Inert,), {"qualname": qualname})
    return _INERT_CLASSES[qualname]


def _rebuild_tensor(storage: StorageRef, storage_offset: int, size, stride, *_ignored) -> TensorRef:
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: TensorRef, *_ignored) -> TensorRef:
    return data


def _rebuild_from_type_v2(func, _new_type, args, _state):
    # torch wraps Parameter subclasses this way; the type and state are Python-side only.
    return func(*args)


def _torch_size(*args):
    return tuple(*args) if args else ()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    # Named as the new type in _rebuild_from_type_v2, which ignores it; never called.
    ("torch", "Tensor"): _inert("torch", "Tensor"),
    ("argparse", "Namespace"): _inert("argparse", "Namespace"),
    ("numpy.core.multiarray", "scalar"): _inert("numpy", "scalar"),
    ("numpy._core.multiarray", "scalar"): _inert("numpy", "scalar"),
    ("numpy", "dtype"): _inert("numpy", "dtype"),
}


class _LazyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str, storages: dict[str, tuple[int, int]]):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._storages = storages  # key -> (absolute data offset, byte length)
        self._refs: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in dtypes.BY_NAME:
            return dtypes.BY_NAME[name]
        if module == "torch" and name in dtypes.BY_STORAGE:  # legacy typed-storage classes in persistent ids
            return dtypes.BY_STORAGE[name]
        if module in ("torch", "torch.storage") and name in ("UntypedStorage", "TypedStorage"):
            return dtypes.uint8
        if module == "deepspeed" or module.startswith("deepspeed."):
            return _inert(module, name)
        raise UnsafePickleError(
            f"refused to load: the pickle asks for the global {module}.{name}, which is not on the allowlist",
            path=self._path,
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptCheckpointError(f"unexpected persistent id {pid!r:.80}", path=self._path)
        _, dtype, key, _location, numel = pid
        key = str(key)
        if key not in self._refs:
            if key not in self._storages:
                raise CorruptCheckpointError(f"storage {key} is missing from the archive", path=self._path)
            offset, nbytes = self._storages[key]
            if not isinstance(dtype, DType):
                raise CorruptCheckpointError(f"storage {key} has no dtype", path=self._path)
            count = nbytes // dtype.itemsize
            if dtype == dtypes.uint8 and numel != count:
                numel = count  # untyped storages count bytes
            if numel * dtype.itemsize > nbytes:
                raise CorruptCheckpointError(f"storage {key} is truncated", path=self._path)
            self._refs[key] = StorageRef(self._path, key, dtype, int(numel), offset)
        return self._refs[key]


def _data_offset(fh, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's data (the local header's extra field may differ)."""
    fh.seek(info.header_offset)
    header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load_lazy(path: str | os.PathLike) -> Any:
    """Unpickle a ``torch.save`` zip file through the allowlist, without reading tensor data.

    Args:
        path: The file.

    Returns:
        The saved object, with every tensor replaced by a :class:`TensorRef`.

    Raises:
        UnsafePickleError: The pickle names a global outside the allowlist.
        CorruptCheckpointError: The file is truncated, not a zip, or inconsistent.
        UnsupportedCheckpointError: The file is in torch's legacy (pre-1.6) format.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                raise UnsupportedCheckpointError(
                    "not a torch zip file (legacy torch.save format or not a checkpoint)",
                    path=path,
                    hint="Re-save it with torch>=1.6, or check that the file is a checkpoint.",
                )
            fh.seek(0)
            with zipfile.ZipFile(fh) as zf:
                pkl_name = None
                storages: dict[str, tuple[int, int]] = {}
                for info in zf.infolist():
                    parts = info.filename.split("/")
                    if parts[-1] == "data.pkl" and len(parts) == 2:
                        pkl_name = info.filename
                    elif len(parts) == 3 and parts[1] == "data":
                        if info.compress_type != zipfile.ZIP_STORED:
                            raise UnsupportedCheckpointError("compressed tensor data", path=path)
                        offset = _data_offset(fh, info)
                        if offset + info.file_size > size:
                            raise CorruptCheckpointError(
                                f"tensor data {info.filename} runs past the end of the file", path=path
                            )
                        storages[parts[2]] = (offset, info.file_size)
                if pkl_name is None:
                    raise CorruptCheckpointError("no data.pkl inside the archive", path=path)
                data = zf.read(pkl_name)
    except zipfile.BadZipFile as exc:
        raise CorruptCheckpointError(f"unreadable torch file ({exc}); it is probably truncated", path=path) from exc
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read file: {exc.strerror or exc}", path=path) from exc
    try:
        return _LazyUnpickler(data, path, storages).load()
    except (UnsafePickleError, CorruptCheckpointError, UnsupportedCheckpointError):
        raise
    except Exception as exc:  # a malformed pickle can raise nearly anything
        raise CorruptCheckpointError(f"malformed pickle ({type(exc).__name__}: {exc})", path=path) from exc


def is_torch_zip(path: str | os.PathLike) -> bool:
    """True when the file starts like a zip archive."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


__all__ = ["Inert", "StorageRef", "TensorRef", "is_torch_zip", "load_lazy"]
