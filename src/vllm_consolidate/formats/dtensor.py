"""DTensors in ``torch.save`` files (verl's per-rank FSDP state dicts), read without torch.

``torch.save`` of a DTensor pickles ``_rebuild_from_type_v2(_rebuild_wrapper_subclass, DTensor,
(DTensor, dtype, size, stride, ...), (None, {"_local_tensor": <tensor>, "_spec": DTensorSpec(...)}))``.
The spec holds the device mesh (with this rank's coordinate on it) and one placement per mesh
dimension. :data:`ALLOW` admits exactly those classes as inert records; the wrapper rebuild becomes
:func:`_wrapper`, which returns a :class:`DTensorShard` after checking every field it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.formats.torch_zip import MAX_DIMS, Allowlist, Inert, TensorRef, is_index
from vllm_consolidate.limits import brief

_SPEC = "torch.distributed.tensor._dtensor_spec"
_PLACEMENTS = "torch.distributed.tensor.placement_types"
_WRAPPER = ("torch._utils", "_rebuild_wrapper_subclass")


@dataclass(frozen=True)
class Placement:
    """How a DTensor is laid out on one mesh dimension: ``shard`` (with ``dim``), ``replicate``,
    ``partial`` or ``strided_shard``."""

    kind: str
    dim: int | None = None

    def __str__(self) -> str:
        return f"{self.kind.title().replace('_', '')}({'' if self.dim is None else self.dim})"


@dataclass(frozen=True)
class DTensorShard:
    """One rank's part of a DTensor, as a ``torch.save`` file describes it.

    Attributes:
        local: This rank's local tensor.
        shape: The full (global) tensor's shape.
        placements: One per mesh dimension.
        coordinate: This rank's coordinate on the mesh, when recorded.
    """

    local: TensorRef
    shape: tuple[int, ...]
    placements: tuple[Placement, ...]
    coordinate: tuple[int, ...] | None


def _bad(what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"malformed DTensor: {what}")


def _fields(obj: Any, cls: str) -> dict[str, Any]:
    if not (isinstance(obj, Inert) and obj.qualname.rsplit(".", 1)[-1] == cls):
        raise _bad(f"expected a {cls}, found {brief(obj)}")
    state = obj.state
    if type(state) is tuple and len(state) == 2 and type(state[1]) is dict and state[0] in (None, {}):
        state = state[1]
    if state is None:
        return {}
    if type(state) is not dict:
        raise _bad(f"{cls} fields are {brief(state)}")
    return state


def _placement(obj: Any) -> Placement:
    name = obj.qualname.rsplit(".", 1)[-1] if isinstance(obj, Inert) else None
    kinds = {"Shard": "shard", "Replicate": "replicate", "Partial": "partial", "_StridedShard": "strided_shard",
             "_Partial": "partial"}
    if name not in kinds:
        raise _bad(f"unknown placement {brief(obj)}")
    dim = _fields(obj, name).get("dim")
    if kinds[name] in ("shard", "strided_shard") and not (is_index(dim) and dim < MAX_DIMS):
        raise _bad(f"{name} on dimension {brief(dim)}")
    return Placement(kinds[name], dim if kinds[name] in ("shard", "strided_shard") else None)


def _coordinate(mesh: Any, ndim: int) -> tuple[int, ...] | None:
    value = _fields(mesh, "DeviceMesh").get("_coordinate_on_dim")
    if value is None:
        return None
    if type(value) not in (tuple, list) or len(value) != ndim or not all(is_index(v) for v in value):
        raise _bad(f"mesh coordinate {brief(value)}")
    return tuple(value)


def _wrapper(unpickler: Any, cls: Any, dtype: Any, size: Any, *rest: Any) -> DTensorShard:
    """Stand-in for ``torch._utils._rebuild_wrapper_subclass`` called by ``_rebuild_from_type_v2``."""
    # ``cls`` is the per-load inert class made for the DTensor global (a class, not an instance).
    if not (isinstance(cls, type) and issubclass(cls, Inert) and cls.qualname.rsplit(".", 1)[-1] == "DTensor"
            ) or not rest:
        raise _bad(f"a wrapper tensor of type {getattr(cls, 'qualname', type(cls).__name__)}, not a DTensor")
    state = rest[-1]  # appended by the rebuild: (dict state, slot state)
    slots = state[1] if type(state) is tuple and len(state) == 2 else state
    if type(slots) is not dict:
        raise _bad("no local tensor")
    local, spec = slots.get("_local_tensor"), slots.get("_spec")
    if type(local) is not TensorRef:
        raise _bad(f"its local tensor is {brief(local)}")
    if type(size) not in (tuple, list) or len(size) > MAX_DIMS or not all(is_index(v) for v in size):
        raise _bad(f"global size {brief(size)}")
    fields = _fields(spec, "DTensorSpec")
    placements = fields.get("placements")
    if type(placements) is not tuple or not 0 < len(placements) <= MAX_DIMS:
        raise _bad(f"placements {brief(placements)}")
    parsed = tuple(_placement(p) for p in placements)
    if local.dtype.name != getattr(dtype, "name", None):
        raise _bad(f"local tensor is {local.dtype}, the DTensor says {getattr(dtype, 'name', 'no dtype')}")
    return DTensorShard(local, tuple(size), parsed, _coordinate(fields.get("mesh"), len(parsed)))


_INERT = frozenset({
    ("torch.distributed.tensor", "DTensor"), ("torch.distributed._tensor.api", "DTensor"),
    ("torch.distributed.tensor._api", "DTensor"),
    (_SPEC, "DTensorSpec"), (_SPEC, "TensorMeta"), (_SPEC, "ShardOrderEntry"),
    ("torch.distributed._tensor.placement_types", "DTensorSpec"),
    ("torch.distributed._tensor.placement_types", "TensorMeta"),
    ("torch.distributed.device_mesh", "DeviceMesh"), ("torch.distributed._mesh_layout", "_MeshLayout"),
    ("torch.distributed._mesh_layout", "_FlatLayout"),
    ("torch", "device"), ("torch.serialization", "_get_layout"),
    *((module, name) for module in (_PLACEMENTS, "torch.distributed._tensor.placement_types")
      for name in ("Shard", "Replicate", "Partial", "_StridedShard", "_Partial")),
})
#: What a ``torch.save`` file of DTensors may name beyond the defaults.
ALLOW = Allowlist(inert=_INERT, calls={_WRAPPER: _wrapper}, wrapper_rebuilds=frozenset({_WRAPPER}))

__all__ = ["ALLOW", "DTensorShard", "Placement"]
