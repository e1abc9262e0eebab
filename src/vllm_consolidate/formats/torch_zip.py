"""Lazy, allowlisted reader for files written by ``torch.save`` (the zip format).

The pickle inside a ``torch.save`` file describes the objects; each tensor's bytes live in a separate,
uncompressed zip member. :func:`load_lazy` unpickles only the description, through an allowlist, and
turns every tensor into a :class:`TensorRef` that knows where its bytes lie in the file. No tensor
data is read, so Adam moments in a 10 GB optimizer file cost nothing; callers read only the byte
ranges they need (see ``vllm_consolidate.io``).

Safety. Every file is treated as hostile:

* :func:`~.torch_archive.read_archive` checks the zip before anything is unpickled: one
  ``data.pkl`` of at most 64 MiB (checked on the declared size, before reading or inflating), no
  duplicate member names, no member overlapping another or running past the file, a bounded
  central directory, tensor data stored uncompressed and little-endian.
* :func:`~.pickle_scan.scan_pickle` bounds the unpickler's work (opcodes, memo, nesting, shared
  "billion laughs" structures, hash flooding) before the C unpickler sees a byte.
* ``find_class`` admits plain containers, torch's tensor rebuild functions, dtypes and a few harmless
  types; ``deepspeed.*`` globals become :class:`Inert` stand-ins (DeepSpeed need not be installed);
  anything else is refused with :class:`~vllm_consolidate.errors.UnsafePickleError`.
* Nothing the pickle is handed can be rewritten by it. A pickle's BUILD opcode calls
  ``__setstate__`` or fills ``__dict__``: every stand-in here is slotted, refuses assignment and
  refuses ``__setstate__`` (Inert accepts it only onto its own ``state`` slot). Nothing handed out is
  shared across loads: dtypes are fresh :class:`_DTypeToken` s mapped back to the real
  :class:`~vllm_consolidate.dtypes.DType` by name, rebuild functions are per-load :class:`_Callable`
  wrappers, inert classes are made per load. A :class:`TensorRef` is accepted only for one of this
  load's own :class:`StorageRef` s, with plain ``int`` offsets, sizes and strides that stay inside
  the storage, which is a member of this zip.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from typing import Any

from vllm_consolidate import dtypes, safe_io
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import (
    ConsolidateError,
    CorruptCheckpointError,
    UnsafePickleError,
    UnsupportedCheckpointError,
)
from vllm_consolidate.formats.pickle_scan import HASHES_ARGS, RESULT_HSAFE, scan_pickle
from vllm_consolidate.formats.torch_archive import read_archive
from vllm_consolidate.source import Segment

#: Tensor dimensions (torch itself stops at 64).
MAX_DIMS = 64
_MAX_INT64 = 2**63 - 1
#: Distinct inert classes one pickle may name (a DeepSpeed checkpoint names about five).
MAX_INERT_CLASSES = 1024


_REWRITE_HINT = ("A torch.save file never does this; it is how a file makes a converter copy other files into "
                 "the weights. Only convert checkpoints you trust.")


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _Frozen:
    """Base of the stand-ins: no ``__dict__``, no assignment, and BUILD refused."""

    __slots__ = ()
    _what = "object"

    def _init(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __setstate__(self, *state: Any) -> None:
        raise UnsafePickleError(f"refused to load: the pickle tries to rewrite the reader's own {self._what}",
                                hint=_REWRITE_HINT)


class StorageRef(_Frozen):
    """A storage inside a torch zip file: where its bytes are (``offset``, absolute), and their dtype."""

    __slots__ = ("path", "key", "dtype", "numel", "offset")
    _what = "storage reference"
    path: str
    key: str
    dtype: DType
    numel: int
    offset: int

    def __init__(self, path: str, key: str, dtype: DType, numel: int, offset: int):
        if not (type(path) is str and type(key) is str and dtypes.BY_NAME.get(getattr(dtype, "name", None)) is dtype
                and _is_index(numel) and _is_index(offset)):
            raise CorruptCheckpointError(f"invalid storage {_clip(str(key))}", path=path)
        self._init(path=path, key=key, dtype=dtype, numel=numel, offset=offset)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def __reduce__(self) -> tuple:
        return (StorageRef, (self.path, self.key, self.dtype, self.numel, self.offset))

    def __repr__(self) -> str:
        return f"StorageRef({self.key!r}, {self.dtype}, numel={self.numel}, offset={self.offset})"


def _is_index(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT64


def _show(value: Any) -> str:
    """A pickled value for an error message, without calling its repr (a shared structure's is exponential)."""
    if type(value) is int and value.bit_length() < 128:
        return str(value)
    if type(value) in (tuple, list) and len(value) <= MAX_DIMS and \
            all(type(v) is int and v.bit_length() < 128 for v in value):
        return _clip(str(tuple(value)))
    return f"a {type(value).__name__}"


class TensorRef(_Frozen):
    """A tensor described by a pickle but not loaded: a view into a :class:`StorageRef`.

    Checked on construction: ``int`` offset, sizes and strides (not bool, float or str), none
    negative, at most :data:`MAX_DIMS` dims, and every element inside the storage.
    """

    __slots__ = ("storage", "storage_offset", "shape", "stride", "numel")
    _what = "tensor reference"
    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    numel: int

    def __init__(self, storage: StorageRef, storage_offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        if type(storage) is not StorageRef:
            raise CorruptCheckpointError("a tensor's storage is not a storage of this file")
        path = storage.path
        if not (type(shape) in (tuple, list) and type(stride) in (tuple, list) and len(shape) == len(stride) <= MAX_DIMS
                and _is_index(storage_offset) and all(_is_index(v) for v in (*shape, *stride))):
            raise CorruptCheckpointError(
                f"impossible tensor (offset {_show(storage_offset)}, shape {_show(shape)}, stride {_show(stride)}): "
                "sizes must be non-negative integers, one stride per dimension", path=path)
        shape, stride = tuple(shape), tuple(stride)
        numel = math.prod(shape)
        # The last element's index; Python ints, so no overflow (each factor < 2**63, at most 64 dims).
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, stride)) if numel else storage_offset - 1
        if last >= storage.numel or storage_offset > storage.numel:
            raise CorruptCheckpointError(
                f"tensor of shape {shape} at offset {storage_offset} reaches past the end of its storage "
                f"{storage.key} ({storage.numel} elements)", path=path)
        self._init(storage=storage, storage_offset=storage_offset, shape=shape, stride=stride, numel=numel)

    @property
    def dtype(self) -> DType:
        return self.storage.dtype

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
        if start < 0 or count < 0 or first + count > self.storage.numel:
            raise CorruptCheckpointError(
                f"tensor reaches past the end of its storage {self.storage.key}", path=self.storage.path
            )
        size = self.dtype.itemsize
        return Segment(self.storage.path, self.storage.offset + first * size, count * size)

    def __reduce__(self) -> tuple:
        return (TensorRef, (self.storage, self.storage_offset, self.shape, self.stride))

    def __repr__(self) -> str:
        return f"TensorRef({self.storage.key!r}, {self.dtype}, shape={self.shape}, offset={self.storage_offset})"


class Inert(_Frozen):
    """Stand-in for a DeepSpeed (or other harmless) class in a checkpoint: it stores what it is given.

    A fresh subclass is made per load and per name. BUILD may set this instance's ``state`` slot and
    nothing else; on the class itself it is refused.
    """

    __slots__ = ("args", "kwargs", "state")
    _what = "inert class"
    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        # Set here rather than in __init__: NEWOBJ calls __new__ only.
        self = super().__new__(cls)
        self._init(args=args, kwargs=kwargs, state=None)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, *state: Any) -> None:
        # On the class itself (BUILD onto the global), ``self`` is the state and nothing is bound.
        if not isinstance(self, Inert) or len(state) != 1:
            raise UnsafePickleError("refused to load: the pickle tries to rewrite the reader's own inert class",
                                    hint=_REWRITE_HINT)
        object.__setattr__(self, "state", state[0])

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return type(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


class _DTypeToken(_Frozen):
    """What a pickle gets for ``torch.float32`` or ``torch.FloatStorage``: a name, nothing shared."""

    __slots__ = ("name",)
    _what = "dtype"

    def __init__(self, name: str):
        self._init(name=name)

    def __reduce__(self) -> tuple:
        return (_DTypeToken, (self.name,))

    def __repr__(self) -> str:
        return f"<dtype {self.name}>"


class _Callable(_Frozen):
    """What a pickle gets for an allowlisted torch function: a per-load wrapper it cannot rewrite."""

    __slots__ = ("fn", "qualname")
    _what = "function"

    def __init__(self, fn: Callable[..., Any], qualname: str):
        self._init(fn=fn, qualname=qualname)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<allowlisted {self.qualname}>"


#: Builtin containers: immutable types, so BUILD on them fails. Flags for the pre-pass (see pickle_scan).
_BUILTINS: dict[tuple[str, str], tuple[Any, int]] = {
    ("collections", "OrderedDict"): (collections.OrderedDict, HASHES_ARGS | RESULT_HSAFE),
    ("collections", "defaultdict"): (collections.defaultdict, HASHES_ARGS | RESULT_HSAFE),
    ("builtins", "set"): (set, HASHES_ARGS | RESULT_HSAFE),
    ("builtins", "frozenset"): (frozenset, HASHES_ARGS),
    ("builtins", "dict"): (dict, HASHES_ARGS | RESULT_HSAFE),
    ("builtins", "list"): (list, RESULT_HSAFE),
    ("builtins", "tuple"): (tuple, 0),
    ("builtins", "slice"): (slice, 0),
    ("builtins", "complex"): (complex, 0),
}
# Protocol 2 with fix_imports (torch.save's default) names builtins by their Python 2 module.
_BUILTINS.update({("__builtin__", name): value for (module, name), value in list(_BUILTINS.items())
                  if module == "builtins"})
#: torch functions -> the _LazyUnpickler method standing in for them.
_CALLS: dict[tuple[str, str], str] = {
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor",
    ("torch._utils", "_rebuild_tensor"): "rebuild_tensor",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "rebuild_parameter",
    ("torch.nn.parameter", "Parameter"): "rebuild_parameter",
    ("torch._tensor", "_rebuild_from_type_v2"): "rebuild_from_type",
    ("torch", "Size"): "torch_size",
}
#: Harmless classes that become Inert stand-ins, besides every ``deepspeed.*`` global.
_INERT: dict[tuple[str, str], str] = {
    ("torch", "Tensor"): "torch.Tensor",  # named as the new type in _rebuild_from_type_v2, never called
    ("argparse", "Namespace"): "argparse.Namespace",
    ("numpy.core.multiarray", "scalar"): "numpy.scalar",
    ("numpy._core.multiarray", "scalar"): "numpy.scalar",
    ("numpy", "dtype"): "numpy.dtype",
}


def _dtype_name(module: str, name: str) -> str | None:
    """The dtype a ``torch.<dtype>`` or ``torch.<Type>Storage`` global stands for, else None."""
    if module == "torch" and name in dtypes.BY_NAME:
        return name
    if module == "torch" and name in dtypes.BY_STORAGE:  # legacy typed-storage classes in persistent ids
        return dtypes.BY_STORAGE[name].name
    if module in ("torch", "torch.storage") and name in ("UntypedStorage", "TypedStorage"):
        return "uint8"
    return None


def _inert_name(module: str, name: str) -> str | None:
    if (module, name) in _INERT:
        return _INERT[module, name]
    if module == "deepspeed" or module.startswith("deepspeed."):
        return _clip(f"{module}.{name}")
    return None


def _classify(module: str, name: str) -> int:
    """Pre-pass flags for the global ``module.name`` (see :mod:`.pickle_scan`)."""
    if (module, name) in _BUILTINS:
        return _BUILTINS[module, name][1]
    if (module, name) in _CALLS:
        return 0 if name == "Size" else RESULT_HSAFE  # tensors hash by identity; a Size is a tuple
    if _inert_name(module, name) is not None:
        return RESULT_HSAFE
    return 0 if _dtype_name(module, name) is not None else HASHES_ARGS  # unknown: assume the worst


class _LazyUnpickler(pickle.Unpickler):
    """Unpickles one ``data.pkl``; everything it hands the pickle is made for this load only."""

    def __init__(self, data: bytes, path: str, storages: dict[str, tuple[int, int]]):
        super().__init__(io.BytesIO(data), fix_imports=False)
        self._path = path
        self._storages = storages  # key -> (absolute data offset, byte length)
        self._refs: dict[str, StorageRef] = {}
        self._globals: dict[tuple[str, str], Any] = {}
        self._inert_classes = 0

    def _refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"refused to load: the pickle {what}", path=self._path)

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in self._globals:
            self._globals[key] = self._resolve(module, name)
        return self._globals[key]

    def _resolve(self, module: str, name: str) -> Any:
        if (module, name) in _BUILTINS:
            return _BUILTINS[module, name][0]
        if (module, name) in _CALLS:
            return _Callable(getattr(self, _CALLS[module, name]), f"{module}.{name}")
        if (dtype := _dtype_name(module, name)) is not None:
            return _DTypeToken(dtype)
        if (qualname := _inert_name(module, name)) is not None:
            self._inert_classes += 1
            if self._inert_classes > MAX_INERT_CLASSES:
                raise self._refuse(f"names more than {MAX_INERT_CLASSES} DeepSpeed classes")
            return type(_clip(name, 40), (Inert,), {"__slots__": (), "qualname": qualname})
        raise self._refuse(f"asks for the global {_clip(module)}.{_clip(name)}, which is not on the allowlist")

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"):
            raise CorruptCheckpointError(f"unexpected persistent id ({_show(pid)})", path=self._path)
        _, token, key, location, numel = pid
        if not (type(token) is _DTypeToken and type(key) is str and type(location) is str and _is_index(numel)):
            raise CorruptCheckpointError(
                f"malformed storage reference (dtype {_show(token)}, key {_show(key)}, numel {_show(numel)})",
                path=self._path)
        dtype = dtypes.BY_NAME[token.name]
        ref = self._refs.get(key)
        if ref is not None:
            if ref.dtype is not dtype:
                raise CorruptCheckpointError(f"storage {_clip(key)} is used as both {ref.dtype} and {dtype}",
                                             path=self._path)
            return ref
        if key not in self._storages:
            raise CorruptCheckpointError(f"storage {_clip(key)} is missing from the archive", path=self._path)
        offset, nbytes = self._storages[key]
        if dtype is dtypes.uint8:
            numel = nbytes  # untyped storages count bytes
        if numel * dtype.itemsize > nbytes:
            raise CorruptCheckpointError(
                f"storage {_clip(key)} holds {nbytes} bytes, less than {numel} {dtype} elements", path=self._path)
        ref = self._refs[key] = StorageRef(self._path, key, dtype, numel, offset)
        return ref

    def rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
        """torch._utils._rebuild_tensor(_v2): ``rest`` is requires_grad, backward_hooks, metadata."""
        if type(storage) is not StorageRef or self._refs.get(storage.key) is not storage:
            raise CorruptCheckpointError(f"a tensor is rebuilt from {_show(storage)}, not from a storage of this file",
                                         path=self._path)
        if len(rest) > 3 or (rest and type(rest[0]) is not bool):
            raise CorruptCheckpointError("malformed tensor arguments", path=self._path)
        return TensorRef(storage, storage_offset, size, stride)

    def rebuild_parameter(self, data: Any, *rest: Any) -> TensorRef:
        if type(data) is not TensorRef or len(rest) > 3:
            raise CorruptCheckpointError(f"a parameter wraps {_show(data)}, not a tensor", path=self._path)
        return data

    def rebuild_from_type(self, func: Any, new_type: Any, args: Any, state: Any) -> TensorRef:
        # torch wraps Parameter subclasses this way; the type and state are Python-side only.
        # ``func`` came through find_class, so a tensor rebuild is one of this load's own wrappers.
        rebuilds = [self._globals.get(k) for k, v in _CALLS.items() if v in ("rebuild_tensor", "rebuild_parameter")]
        if not any(func is f for f in rebuilds if f is not None) or type(args) is not tuple:
            raise self._refuse("asks _rebuild_from_type_v2 to call something other than a tensor rebuild")
        return func(*args)

    def torch_size(self, *args: Any) -> tuple[int, ...]:
        dims = args[0] if len(args) == 1 else None if args else ()
        if type(dims) not in (tuple, list) or len(dims) > MAX_DIMS or not all(_is_index(d) for d in dims):
            raise CorruptCheckpointError(f"impossible torch.Size({_show(dims)})", path=self._path)
        return tuple(dims)


def _unpickle(data: bytes, path: str, storages: dict[str, tuple[int, int]]) -> Any:
    scan_pickle(data, _classify, path=path)
    try:
        return _LazyUnpickler(data, path, storages).load()
    except ConsolidateError as exc:
        exc.path = exc.path or path  # raised by a stand-in, which does not know the file
        raise
    except Exception as exc:  # a malformed pickle can raise nearly anything
        # Never format the exception with repr: its arguments may be the pickle's own objects.
        detail = exc.args[0] if exc.args and type(exc.args[0]) is str else ""
        raise CorruptCheckpointError(f"malformed pickle ({type(exc).__name__}: {_clip(detail, 200)})",
                                     path=path) from None


def load_lazy(path: str | os.PathLike) -> Any:
    """Unpickle a ``torch.save`` zip file through the allowlist, without reading tensor data.

    Args:
        path: The file.

    Returns:
        The saved object, with every tensor replaced by a :class:`TensorRef`.

    Raises:
        UnsafePickleError: The pickle names a global outside the allowlist, tries to rewrite the
            reader's objects, or passes a cap (size, opcodes, nesting, shared structure).
        CorruptCheckpointError: The file is truncated, not a zip, not a regular file, or inconsistent.
        UnsupportedCheckpointError: The file is in torch's legacy (pre-1.6) format.
    """
    path = os.fspath(path)
    try:
        with safe_io.open_file(path) as fh:
            if fh.read(4) != b"PK\x03\x04":
                raise UnsupportedCheckpointError(
                    "not a torch zip file (legacy torch.save format or not a checkpoint)",
                    path=path,
                    hint="Re-save it with torch>=1.6, or check that the file is a checkpoint.",
                )
            data, storages = read_archive(fh, os.fstat(fh.fileno()).st_size, path)
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error, NotImplementedError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"unreadable torch file ({_clip(str(exc), 200)}); it is probably truncated",
                                     path=path) from exc
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read file: {exc.strerror or exc}", path=path) from exc
    return _unpickle(data, path, storages)


def is_torch_zip(path: str | os.PathLike) -> bool:
    """True when the file is a regular file that starts like a zip archive."""
    try:
        with safe_io.open_file(path) as fh:
            return fh.read(4) == b"PK\x03\x04"
    except (ConsolidateError, OSError):
        return False


__all__ = ["Inert", "StorageRef", "TensorRef", "is_torch_zip", "load_lazy"]
