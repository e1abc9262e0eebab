"""Lazy, allowlisted reader for files written by ``torch.save`` (the zip format).

The pickle inside a ``torch.save`` file describes the objects; each tensor's bytes live in a separate,
uncompressed zip member. :func:`load_lazy` unpickles only the description, through an allowlist, and
turns every tensor into a :class:`TensorRef` that knows where its bytes lie in the file. No tensor
data is read, so Adam moments in a 10 GB optimizer file cost nothing; callers read only the byte
ranges they need (see :mod:`vllm_consolidate.read.ranges`).

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
  shared across loads: dtypes are fresh :class:`DTypeToken` s mapped back to the real
  :class:`~vllm_consolidate.dtypes.DType` by name, rebuild functions are per-load :class:`AllowedCallable`
  wrappers, inert classes are made per load. A :class:`TensorRef` is accepted only for one of this
  load's own :class:`StorageRef` s, with plain ``int`` offsets, sizes and strides that stay inside
  the storage, which is a member of this zip.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

from vllm_consolidate import dtypes, safe_io
from vllm_consolidate.errors import (
    ConsolidateError,
    CorruptCheckpointError,
    LimitExceededError,
    UnsafePickleError,
    UnsupportedCheckpointError,
)
from vllm_consolidate.formats.pickle_scan import HASHES_ARGS, RESULT_HSAFE, scan_pickle
from vllm_consolidate.formats.torch_archive import read_archive
from vllm_consolidate.formats.torch_standins import (  # re-exported: the readers import them from here
    MAX_DIMS,
    MAX_INERT_CLASSES,
    AllowedCallable,
    DTypeToken,
    Inert,
    StorageRef,
    TensorRef,
    clip,
    is_index,
)
from vllm_consolidate.limits import brief

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
        return clip(f"{module}.{name}")
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


class Allowlist:
    """Globals admitted beyond the torch.save defaults, for one file format.

    Attributes:
        inert: ``(module, name)`` globals that become :class:`Inert` stand-ins (records the reader
            interprets afterwards, never code).
        calls: ``(module, name)`` -> a function ``f(unpickler, *args)`` standing in for a torch function.
        wrapper_rebuilds: Names in ``calls`` that ``_rebuild_from_type_v2`` may call (tensor subclasses).
    """

    def __init__(self, inert: frozenset[tuple[str, str]] = frozenset(),
                 calls: dict[tuple[str, str], Any] | None = None,
                 wrapper_rebuilds: frozenset[tuple[str, str]] = frozenset(), *, identity_only: bool = False):
        self.inert = inert
        self.calls = dict(calls or {})
        self.wrapper_rebuilds = wrapper_rebuilds
        #: Admit only globals whose results hash by identity (no containers, no tuples): then a
        #: protocol-4 STACK_GLOBAL, whose name the pre-pass cannot see, is known to be harmless as a
        #: dict key. ``torch.Size`` must then be among ``calls`` (returning a stand-in).
        self.identity_only = identity_only


_DEFAULT = Allowlist()


class _LazyUnpickler(pickle.Unpickler):
    """Unpickles one ``data.pkl``; everything it hands the pickle is made for this load only."""

    def __init__(self, data: bytes, path: str, storages: dict[str, tuple[int, int]], allow: Allowlist = _DEFAULT):
        super().__init__(io.BytesIO(data), fix_imports=False)
        self._path = path
        self._storages = storages  # key -> (absolute data offset, byte length)
        self._refs: dict[str, StorageRef] = {}
        self._globals: dict[tuple[str, str], Any] = {}
        self._inert_classes = 0
        self._allow = allow

    def _refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"refused to load: the pickle {what}", path=self._path)

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in self._globals:
            self._globals[key] = self._resolve(module, name)
        return self._globals[key]

    def _resolve(self, module: str, name: str) -> Any:
        if (module, name) in self._allow.calls:
            fn = self._allow.calls[module, name]
            return AllowedCallable(lambda *args: fn(self, *args), f"{module}.{name}")
        if self._allow.identity_only and (module, name) not in self._allow.inert and _dtype_name(module, name) is None:
            raise self._refuse(f"asks for the global {clip(module)}.{clip(name)}, which is not on the allowlist")
        if (module, name) in _BUILTINS:
            return _BUILTINS[module, name][0]
        if (module, name) in _CALLS:
            return AllowedCallable(getattr(self, _CALLS[module, name]), f"{module}.{name}")
        if (dtype := _dtype_name(module, name)) is not None:
            return DTypeToken(dtype)
        if (module, name) in self._allow.inert:
            qualname = clip(f"{module}.{name}")
        else:
            qualname = _inert_name(module, name)
        if qualname is not None:
            self._inert_classes += 1
            if self._inert_classes > MAX_INERT_CLASSES:
                raise LimitExceededError(f"refused to load: the pickle names more than {MAX_INERT_CLASSES} DeepSpeed "
                                         "classes", path=self._path)
            return type(clip(name, 40), (Inert,), {"__slots__": (), "qualname": qualname})
        raise self._refuse(f"asks for the global {clip(module)}.{clip(name)}, which is not on the allowlist")

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"):
            raise CorruptCheckpointError(f"unexpected persistent id ({brief(pid)})", path=self._path)
        _, token, key, location, numel = pid
        if not (type(token) is DTypeToken and type(key) is str and type(location) is str and is_index(numel)):
            raise CorruptCheckpointError(
                f"malformed storage reference (dtype {brief(token)}, key {brief(key)}, numel {brief(numel)})",
                path=self._path)
        dtype = dtypes.BY_NAME[token.name]
        ref = self._refs.get(key)
        if ref is not None:
            if ref.dtype is not dtype:
                raise CorruptCheckpointError(f"storage {clip(key)} is used as both {ref.dtype} and {dtype}",
                                             path=self._path)
            return ref
        if key not in self._storages:
            raise CorruptCheckpointError(f"storage {clip(key)} is missing from the archive", path=self._path)
        offset, nbytes = self._storages[key]
        if dtype is dtypes.uint8:
            numel = nbytes  # untyped storages count bytes
        if numel * dtype.itemsize > nbytes:
            raise CorruptCheckpointError(
                f"storage {clip(key)} holds {nbytes} bytes, less than {numel} {dtype} elements", path=self._path)
        ref = self._refs[key] = StorageRef(self._path, key, dtype, numel, offset)
        return ref

    def rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
        """torch._utils._rebuild_tensor(_v2): ``rest`` is requires_grad, backward_hooks, metadata."""
        if type(storage) is not StorageRef or self._refs.get(storage.key) is not storage:
            raise CorruptCheckpointError(f"a tensor is rebuilt from {brief(storage)}, not from a storage of this file",
                                         path=self._path)
        if len(rest) > 3 or (rest and type(rest[0]) is not bool):
            raise CorruptCheckpointError("malformed tensor arguments", path=self._path)
        return TensorRef(storage, storage_offset, size, stride)

    def rebuild_parameter(self, data: Any, *rest: Any) -> TensorRef:
        if type(data) is not TensorRef or len(rest) > 3:
            raise CorruptCheckpointError(f"a parameter wraps {brief(data)}, not a tensor", path=self._path)
        return data

    def rebuild_from_type(self, func: Any, new_type: Any, args: Any, state: Any) -> TensorRef:
        # torch wraps Parameter subclasses this way; the type and state are Python-side only.
        # ``func`` came through find_class, so a tensor rebuild is one of this load's own wrappers.
        rebuilds = [self._globals.get(k) for k, v in _CALLS.items() if v in ("rebuild_tensor", "rebuild_parameter")]
        wrappers = [self._globals.get(k) for k in self._allow.wrapper_rebuilds]
        if type(args) is not tuple:
            raise self._refuse("passes _rebuild_from_type_v2 arguments that are not a tuple")
        if any(func is f for f in wrappers if f is not None):
            # A tensor subclass (DTensor): ``func`` builds a stand-in from ``args``; ``state`` carries
            # the local tensor and its spec, which only the format's own reader interprets.
            return func(*args, state)
        if not any(func is f for f in rebuilds if f is not None):
            raise self._refuse("asks _rebuild_from_type_v2 to call something other than a tensor rebuild")
        return func(*args)

    def torch_size(self, *args: Any) -> tuple[int, ...]:
        dims = args[0] if len(args) == 1 else None if args else ()
        if type(dims) not in (tuple, list) or len(dims) > MAX_DIMS or not all(is_index(d) for d in dims):
            raise CorruptCheckpointError(f"impossible torch.Size({brief(dims)})", path=self._path)
        return tuple(dims)


#: Small pickles that passed the pre-pass and loaded, with their allowlist (oldest first, dropped first).
_SCANNED: collections.OrderedDict[tuple[bytes, Allowlist], None] = collections.OrderedDict()
_SCANNED_MAX_BYTES, _SCANNED_ENTRIES = 4096, 256


def _unpickle(data: bytes, path: str, storages: dict[str, tuple[int, int]], allow: Allowlist = _DEFAULT) -> Any:
    def classify(module: str, name: str) -> int:
        if (module, name) in allow.inert or (module, name) in allow.calls:
            return RESULT_HSAFE  # stand-ins hash by identity
        return _classify(module, name)

    # The pre-pass is a pure function of the bytes and the allowlist: the many identical small pickles
    # of one save (a DCP chunk's data.pkl differs only where its shape does) are scanned once. Only a
    # pickle that loaded is remembered.
    known = (data, allow)
    if known not in _SCANNED:
        scan_pickle(data, classify, path=path, stack_flags=RESULT_HSAFE if allow.identity_only else HASHES_ARGS)
    try:
        loaded = _LazyUnpickler(data, path, storages, allow).load()
        if len(data) <= _SCANNED_MAX_BYTES and known not in _SCANNED:
            _SCANNED[known] = None
            if len(_SCANNED) > _SCANNED_ENTRIES:
                _SCANNED.popitem(last=False)
        return loaded
    except ConsolidateError as exc:
        exc.path = exc.path or path  # raised by a stand-in, which does not know the file
        raise
    except Exception as exc:  # a malformed pickle can raise nearly anything
        # Never format the exception with repr: its arguments may be the pickle's own objects.
        detail = exc.args[0] if exc.args and type(exc.args[0]) is str else ""
        raise CorruptCheckpointError(f"malformed pickle ({type(exc).__name__}: {clip(detail, 200)})",
                                     path=path) from None


#: An archive inside a larger file (a DCP chunk) up to this size is read whole: large worlds store
#: thousands of chunks of a few KB, and per-record reads through a window dominate their cost.
SMALL_ARCHIVE_BYTES = 1 << 20


def load_lazy(path: str | os.PathLike, *, start: int = 0, length: int | None = None,
              allow: Allowlist = _DEFAULT) -> Any:
    """Unpickle a ``torch.save`` zip file through the allowlist, without reading tensor data.

    Args:
        path: The file.
        start: Where the archive starts in the file (a DCP ``.distcp`` holds many archives).
        length: The archive's length in bytes (default: to the end of the file).
        allow: Globals admitted beyond the defaults, for formats built on ``torch.save``.

    Returns:
        The saved object, with every tensor replaced by a :class:`TensorRef`.

    Raises:
        UnsafePickleError: The pickle names a global outside the allowlist, tries to rewrite the
            reader's objects, or uses what torch.save never writes to defeat the reader's bounds.
        LimitExceededError: A cap is passed (data.pkl or zip directory size, opcodes, nesting,
            shared structure, integer width, classes named).
        CorruptCheckpointError: The file is truncated, not a zip, not a regular file, or inconsistent.
        UnsupportedCheckpointError: The file is in torch's legacy (pre-1.6) format.
    """
    path = os.fspath(path)
    try:
        with safe_io.open_file(path) as fh:
            size = fh.size
            if start or length is not None:
                if length is None or start < 0 or length < 0 or start + length > size:
                    raise CorruptCheckpointError(
                        f"bytes {start}..{start + (length or 0)} lie past the end of the file ({size} bytes); it is "
                        "probably truncated", path=path)
                if length <= SMALL_ARCHIVE_BYTES:  # one read, not a seek and read per zip record
                    fh.seek(start)
                    fh = io.BytesIO(fh.read(length))
                else:
                    fh = fh.window(start, length)
                size = length
            if fh.read(4) != b"PK\x03\x04":
                raise UnsupportedCheckpointError(
                    "not a torch zip file (legacy torch.save format or not a checkpoint)",
                    path=path,
                    hint="Re-save it with torch>=1.6, or check that the file is a checkpoint.",
                )
            data, storages = read_archive(fh, size, path)
            if start:
                storages = {key: (offset + start, nbytes) for key, (offset, nbytes) in storages.items()}
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error, NotImplementedError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"unreadable torch file ({clip(str(exc), 200)}); it is probably truncated",
                                     path=path) from exc
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read file: {exc.strerror or exc}", path=path) from exc
    return _unpickle(data, path, storages, allow)


def load_pickle(data: bytes, path: str | os.PathLike, allow: Allowlist) -> Any:
    """Unpickle a plain pickle (no zip, no tensors) through the allowlist, e.g. a DCP ``.metadata``."""
    return _unpickle(data, os.fspath(path), {}, allow)


__all__ = ["Allowlist", "Inert", "StorageRef", "TensorRef", "load_lazy", "load_pickle"]
