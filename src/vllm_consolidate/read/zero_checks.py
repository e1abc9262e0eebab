"""Checks of a ZeRO checkpoint's pickled numbers against each other and against the rank files.

Everything in a rank file's pickle is a claim. :mod:`.deepspeed` takes only what these functions
have checked:

* **Types.** ``zero_stage`` is an int (or DeepSpeed's ``ZeroStageEnum(n)`` stand-in);
  ``partition_count`` a positive int, or a list of them (one per group) that all agree; shapes are
  lists of ints within :mod:`.limits`; names are ``str``; tensors are tensors. No ``int()`` of
  arbitrary objects, no recursion into nested lists.
* **Counts before structures.** ``partition_count`` may not exceed the rank files present (a forged
  ``10**12`` would otherwise be looped over); the parameters' element counts are compared with
  the elements the ranks actually hold before any per-parameter byte range is built.
* **Rank identity** (a rank file copied over another, or two files swapped, gives wrong weights
  that look fine). ZeRO-1/2: by sizes and bytes, in :mod:`.zero_slices` (which also says which
  pickled fields DeepSpeed's own consolidation uses, and why ``param_slice_mappings`` is only
  advisory). Any stage, content: ZeRO-3 rank files record nothing per rank, so two files are
  called copies when they have the same size, the same first and last KiB of every fp32 flat
  tensor (or frozen fragment), not all zero, and the same bytes of their ``data.pkl``
  (:func:`check_distinct`). Two real ranks hold different slices of trained weights, so equal
  samples mean a copy; all-zero samples (an untrained all-zero group) prove nothing and are not
  compared. A swap of two ZeRO-3 files (renamed, not copied) cannot be seen from the files and is
  not detected.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError
from vllm_consolidate.formats.torch_zip import Inert, TensorRef
from vllm_consolidate.limits import brief, checked_shape, is_int
from vllm_consolidate.safe_io import KIB, MIB, open_file, open_source
from vllm_consolidate.storage.bytefile import ByteFile

#: Bytes compared at each end of each flat tensor for the identical-copy check.
SAMPLE_BYTES = KIB
_MIXED_HINT = "The folder mixes or duplicates rank files; copy every rank's own file from where training saved it."


def require(mapping: Any, key: str, path: Path) -> Any:
    """``mapping[key]``, where ``mapping`` must be a dict that has it."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise CorruptCheckpointError(f"'{key}' is missing; this is not a DeepSpeed ZeRO checkpoint file", path=path)
    return mapping[key]


def str_keyed(value: Any, what: str, path: Path, *, values: type | tuple[type, ...] | None = None) -> dict:
    """``value`` if it is a dict whose keys are ``str`` (and whose values are ``values``, when given)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"'{what}' is {brief(value)}, not a dict", path=path)
    for key, item in value.items():
        if not isinstance(key, str):
            raise CorruptCheckpointError(f"'{what}' has the key {brief(key)} ({type(key).__name__}), not a name",
                                         path=path)
        if values is not None and not isinstance(item, values):
            raise CorruptCheckpointError(f"'{what}'[{brief(key)}] is {brief(item)}, not a {_names(values)}",
                                         path=path)
    return value


def _names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def zero_stage(value: Any, path: Path) -> int:
    """The ZeRO stage: an int, or the ``ZeroStageEnum(n)`` stand-in the pickle builds."""
    if isinstance(value, Inert):
        args = getattr(value, "args", ())
        value = args[0] if isinstance(args, tuple) and len(args) == 1 else value
    if not is_int(value):
        raise CorruptCheckpointError(f"zero_stage is {brief(value)}, not a stage number", path=path)
    return value


def partition_count(value: Any, path: Path) -> int:
    """The world size a rank file records: a positive int, or one per group, all equal.

    The caller compares it with the rank files present before sizing anything by it.
    """
    counts = list(value) if isinstance(value, (list, tuple)) else [value]
    if not counts or not all(is_int(c) and c > 0 for c in counts):
        raise CorruptCheckpointError(f"partition_count is {brief(value)}, not a positive number of ranks", path=path)
    if len(set(counts)) != 1:
        raise UnsupportedCheckpointError(
            f"parameter groups are partitioned over different numbers of ranks ({brief(value)}), as with "
            "expert parallelism; this is not supported", path=path)
    return counts[0]


def param_shapes(value: Any, path: Path) -> list[dict[str, tuple[int, ...]]]:
    """``param_shapes`` as a list of ``{name: shape}`` groups (a single dict is one group)."""
    groups = [value] if isinstance(value, dict) else value
    if not isinstance(groups, (list, tuple)):
        raise CorruptCheckpointError(f"param_shapes is {brief(value)}, not a list of groups", path=path)
    return [shapes_of(group, "param_shapes", path) for group in groups]


def shapes_of(value: Any, what: str, path: Path) -> dict[str, tuple[int, ...]]:
    """A ``{name: shape}`` dict with every shape checked (see :func:`.limits.checked_shape`)."""
    return {name: checked_shape(shape, what=f"{what} {brief(name)}", path=path)
            for name, shape in str_keyed(value, what, path).items()}


def flat_groups(value: Any, key: str, path: Path) -> list[TensorRef]:
    """A rank's flat fp32 groups: 1-D float32 tensors."""
    groups = [value] if isinstance(value, TensorRef) else value
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, TensorRef) for g in groups):
        raise CorruptCheckpointError(f"'{key}' is {brief(value)}, not a list of tensors", path=path)
    for g in groups:
        if len(g.shape) != 1:
            raise CorruptCheckpointError(f"'{key}' holds a tensor of shape {brief(list(g.shape))}, not 1-D", path=path)
        if g.dtype != dtypes.float32:
            raise UnsupportedCheckpointError(
                f"'{key}' holds {g.dtype.name} master weights; only fp32 masters are read", path=path)
    return list(groups)


def _sample(src: ByteFile, refs: Iterable[TensorRef]) -> tuple[bytes, bool]:
    """The first and last :data:`SAMPLE_BYTES` of each tensor, hashed; and whether any byte was non-zero."""
    h, nonzero = hashlib.sha256(), False
    for ref in refs:
        if not ref.numel:
            continue
        seg = ref.segment()
        n = min(SAMPLE_BYTES, seg.nbytes)
        for offset in (seg.offset, seg.offset + seg.nbytes - n):
            data = src.pread(n, offset)
            nonzero = nonzero or data.count(0) != len(data)
            h.update(len(data).to_bytes(8, "little") + data)
    return h.digest(), nonzero


def _pickle_digest(path: Path) -> bytes:
    """SHA-256 of the ``data.pkl`` member of a torch zip, streamed."""
    h = hashlib.sha256()
    try:
        with open_file(path) as fh, zipfile.ZipFile(fh) as zf:
            for info in zf.infolist():
                if info.filename.endswith("/data.pkl") and info.filename.count("/") == 1:
                    with zf.open(info) as member:
                        while chunk := member.read(4 * MIB):
                            h.update(chunk)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptCheckpointError(f"unreadable torch file ({exc})", path=path) from exc
    return h.digest()


def check_distinct(files: list[tuple[Path, list[TensorRef]]]) -> None:
    """No two rank files are copies of each other (see "Rank identity" in the module docstring).

    Args:
        files: Each rank file with the tensors whose ends are sampled (its flat groups, or its frozen fragments).

    Raises:
        CorruptCheckpointError: Two files have the same size, samples and ``data.pkl``; names both.
    """
    seen: dict[tuple[int, bytes], Path] = {}
    for path, refs in files:
        src = open_source(path)
        try:
            size = src.size
            digest, nonzero = _sample(src, refs)
        except OSError as exc:
            raise CorruptCheckpointError(f"cannot read file: {exc.strerror or exc}", path=path) from exc
        finally:
            src.close()
        if not nonzero:
            continue
        first = seen.setdefault((size, digest), path)
        if first is not path and _pickle_digest(first) == _pickle_digest(path):
            raise CorruptCheckpointError(
                f"{path.name} is a copy of {first.name}: same size, same metadata and the same weights at "
                "both ends of every partition, which two ranks never hold", path=path, hint=_MIXED_HINT)


__all__ = [
    "SAMPLE_BYTES", "check_distinct", "flat_groups", "param_shapes", "partition_count", "require", "shapes_of",
    "str_keyed", "zero_stage",
]
