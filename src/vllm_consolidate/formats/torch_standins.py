"""The stand-ins a ``torch.save`` pickle is handed, built so that the pickle cannot rewrite them.

A pickle's BUILD opcode calls ``__setstate__`` or fills ``__dict__`` of whatever object it names.
Every class here is slotted (no ``__dict__``), refuses assignment after construction and refuses
``__setstate__`` (:class:`Inert` accepts it only onto its own ``state`` slot). A :class:`TensorRef`
checks its own fields when it is built: plain ``int`` offsets, sizes and strides, none negative, every
element inside its :class:`StorageRef`. So a rewritten file path, offset, size or dtype is impossible
by construction, not caught by a later check. :mod:`.torch_zip` hands these out, fresh for each load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import CorruptCheckpointError, UnsafePickleError, UnsupportedCheckpointError
from vllm_consolidate.limits import brief
from vllm_consolidate.source import Segment

#: Tensor dimensions (torch itself stops at 64).
MAX_DIMS = 64
_MAX_INT64 = 2**63 - 1
#: Distinct inert classes one pickle may name (a DeepSpeed checkpoint names about five).
MAX_INERT_CLASSES = 1024


_REWRITE_HINT = ("A torch.save file never does this; it is how a file makes a converter copy other files into "
                 "the weights. Only convert checkpoints you trust.")


def clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class Frozen:
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


class StorageRef(Frozen):
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
                and is_index(numel) and is_index(offset)):
            raise CorruptCheckpointError(f"invalid storage {clip(str(key))}", path=path)
        self._init(path=path, key=key, dtype=dtype, numel=numel, offset=offset)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def __reduce__(self) -> tuple:
        return (StorageRef, (self.path, self.key, self.dtype, self.numel, self.offset))

    def __repr__(self) -> str:
        return f"StorageRef({self.key!r}, {self.dtype}, numel={self.numel}, offset={self.offset})"


def is_index(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT64


class TensorRef(Frozen):
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
                and is_index(storage_offset) and all(is_index(v) for v in (*shape, *stride))):
            raise CorruptCheckpointError(
                f"impossible tensor (offset {brief(storage_offset)}, shape {brief(shape)}, stride {brief(stride)}): "
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


class Inert(Frozen):
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


class DTypeToken(Frozen):
    """What a pickle gets for ``torch.float32`` or ``torch.FloatStorage``: a name, nothing shared."""

    __slots__ = ("name",)
    _what = "dtype"

    def __init__(self, name: str):
        self._init(name=name)

    def __reduce__(self) -> tuple:
        return (DTypeToken, (self.name,))

    def __repr__(self) -> str:
        return f"<dtype {self.name}>"


class AllowedCallable(Frozen):
    """What a pickle gets for an allowlisted torch function: a per-load wrapper it cannot rewrite."""

    __slots__ = ("fn", "qualname")
    _what = "function"

    def __init__(self, fn: Callable[..., Any], qualname: str):
        self._init(fn=fn, qualname=qualname)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<allowlisted {self.qualname}>"
