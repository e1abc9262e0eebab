"""Megatron-Core's ``common.pt``: the non-sharded state of a ``torch_dist`` save, read without running it.

Megatron-LM saves, beside the sharded tensors, a plain ``torch.save`` of what is not sharded: the
iteration, the checkpoint version and ``args``, the ``argparse.Namespace`` of the training run (layer
count, heads, query groups, vocabulary sizes...). The reader wants a few numbers from ``args`` when no
config.json gives the head layout. It is unpickled through the allowlist: ``Namespace`` and the few
Megatron enums found in real ``args`` become inert records whose fields are read as plain values;
anything else is refused (:class:`~vllm_consolidate.errors.UnsafePickleError`), and nothing is called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.formats.torch_zip import Allowlist, Inert, load_lazy
from vllm_consolidate.limits import brief

COMMON_FILE = "common.pt"
#: Classes real Megatron-LM ``args`` hold, as inert stand-ins (enums pickle as ``Enum(value)``).
ALLOW = Allowlist(inert=frozenset({
    ("argparse", "Namespace"),
    ("torch", "device"),
    ("megatron.core.transformer.enums", "AttnBackend"),
    ("megatron.core.transformer.enums", "AttnMaskType"),
    ("megatron.core.enums", "ModelType"),
    ("megatron.core.num_microbatches_calculator", "ConstantNumMicroBatchesCalculator"),
}))
#: The ``args`` fields kept, each a plain value (ints, floats, bools, strings).
_SCALARS = (int, float, bool, str, type(None))


def _fields(obj: Any) -> dict[str, Any]:
    """A Namespace stand-in's scalar fields (BUILD gave it ``__dict__`` as its state)."""
    state = obj.state if isinstance(obj, Inert) and obj.qualname == "argparse.Namespace" else None
    if type(state) is tuple and len(state) == 2 and type(state[1]) is dict and state[0] is None:
        state = state[1]
    if type(state) is not dict:
        raise CorruptCheckpointError(f"args is {brief(obj)}, not an argparse.Namespace")
    return {k: v for k, v in state.items() if type(k) is str and type(v) in _SCALARS}


def read_args(folder: Path) -> dict[str, Any] | None:
    """Megatron-LM's ``args`` in ``folder/common.pt`` as ``{field: plain value}``; None when there are none.

    Raises:
        UnsafePickleError: The pickle names a class outside the allowlist.
        CorruptCheckpointError: The file is not a dict, or its ``args`` is not a Namespace.
    """
    path = Path(folder) / COMMON_FILE
    if not os.path.lexists(path):
        return None
    common = load_lazy(path, allow=ALLOW)
    if type(common) is not dict:
        raise CorruptCheckpointError(f"{COMMON_FILE} holds {brief(common)}, not a dict", path=path)
    if "args" not in common:
        return None
    try:
        return _fields(common["args"])
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(exc.message, path=path) from None


__all__ = ["ALLOW", "COMMON_FILE", "read_args"]
