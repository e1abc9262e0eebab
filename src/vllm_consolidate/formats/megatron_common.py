"""Megatron-Core's common state and Megatron-Bridge's ``run_config.yaml``: a save's model config, read without
running anything.

Megatron-LM saves, beside the sharded tensors, a plain ``torch.save`` of what is not sharded: the
iteration, the checkpoint version and ``args``, the ``argparse.Namespace`` of the training run (layer
count, heads, query groups, vocabulary sizes...). Up to megatron-core 0.18 that is the file ``common.pt``
(:func:`read_args`); from 0.19 (Megatron-LM since July 2026) there is no ``common.pt``: the same dict, in a
one-element list, is ``torch.save``-d as the ``ShardedObject`` ``common_state``, a DCP bytes entry
(``BytesStorageMetadata``, key :data:`COMMON_STATE_KEY`) written by rank 0 inside its ``.distcp`` file, at the
offset the ``.metadata`` gives (:func:`read_common_state_args`); ``metadata.json`` is unchanged. The reader
wants a few numbers from ``args`` when no config.json gives the head layout. It is unpickled through the
allowlist: ``Namespace`` and the few Megatron enums found in real ``args`` become inert records whose fields
are read as plain values; anything else is refused (:class:`~vllm_consolidate.errors.UnsafePickleError`), and
nothing is called.

Megatron-Bridge writes no ``args``: beside each save (``iter_NNNNNNN/``, with ``train_state.pt`` and an
optional ``tokenizer/``) it writes ``run_config.yaml``, its whole ``ConfigContainer`` dumped by
``yaml.safe_dump``, whose ``model:`` mapping holds megatron-core's ``TransformerConfig`` fields plus the GPT
ones (``vocab_size``, ``rotary_base``, ``share_embeddings_and_output_weights``...): flat in the provider form
(``_target_: ...GPTModelProvider``), or the transformer fields nested under ``transformer:`` in the newer
``_builder_`` form. NeMo 2 writes ``context/model.yaml`` beside ``weights/``, whose ``config:`` mapping is its
``GPTConfig`` (the same megatron-core field names). :func:`read_run_config` and :func:`read_nemo_model_yaml`
parse them with ``yaml.safe_load`` (plain data only: the ``_target_`` strings are read as strings, never
imported) from a bounded read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import CorruptCheckpointError, LimitExceededError
from vllm_consolidate.formats.torch_zip import Allowlist, Inert, load_lazy
from vllm_consolidate.limits import brief
from vllm_consolidate.safe_io import read_text

COMMON_FILE = "common.pt"
#: The DCP key of megatron-core 0.19+'s common state: ``ShardedObject("common_state", ..., (1,), (0,)).unique_key``.
COMMON_STATE_KEY = "common_state/shard_0_1"
#: A real common state is a few KB (args, scheduler, optimizer param groups); the cap is far above that.
MAX_COMMON_STATE_BYTES = 64 * 2**20
#: Megatron-Bridge's config file in each save folder.
RUN_CONFIG_FILE = "run_config.yaml"
#: NeMo 2's model config, beside its ``weights/`` (``io_dump`` of the model: ``config:`` is its GPTConfig).
NEMO_MODEL_YAML = Path("context") / "model.yaml"
#: A real run_config.yaml or model.yaml is tens of KB (every training setting); the cap is far above that.
MAX_RUN_CONFIG_BYTES = 4 * 2**20
#: Classes real Megatron-LM ``args`` hold, as inert stand-ins (enums pickle as ``Enum(value)``).
ALLOW = Allowlist(inert=frozenset({
    ("argparse", "Namespace"),
    ("torch", "device"),
    ("megatron.core.transformer.enums", "AttnBackend"),
    ("megatron.core.transformer.enums", "AttnMaskType"),
    # Megatron-LM 0.19's validate_args always sets inference_cuda_graph_scope to an InferenceCudaGraphScope;
    # --cuda-graph-modules (0.19) / --cuda-graph-scope (0.16) are lists of the other two; exit_signal is a Signals.
    ("megatron.core.transformer.enums", "InferenceCudaGraphScope"),
    ("megatron.core.transformer.enums", "CudaGraphModule"),
    ("megatron.core.transformer.enums", "CudaGraphScope"),
    ("signal", "Signals"),
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
    return _args(load_lazy(path, allow=ALLOW), COMMON_FILE, path)


def read_common_state_args(path: Path, start: int, length: int) -> dict[str, Any] | None:
    """Megatron-LM's ``args`` in megatron-core 0.19+'s ``common_state`` object, the ``torch.save`` archive at
    ``start`` (``length`` bytes) in the storage file ``path`` (as the DCP metadata places it), as
    :func:`read_args` returns them; None when the common state has no ``args`` (a bare NeMo or Bridge save).

    Raises:
        LimitExceededError: The entry is longer than :data:`MAX_COMMON_STATE_BYTES` (nothing is read).
        UnsafePickleError: The pickle names a class outside the allowlist.
        CorruptCheckpointError: The archive is unreadable, not a one-element list of a dict, or its ``args`` is
            not a Namespace.
    """
    what = f"the DCP object {COMMON_STATE_KEY}"
    if length > MAX_COMMON_STATE_BYTES:
        raise LimitExceededError(f"{what} is {length:,} bytes; a real one is a few KB (the cap is "
                                 f"{MAX_COMMON_STATE_BYTES:,})", path=path)
    saved = load_lazy(path, start=start, length=length, allow=ALLOW)
    if type(saved) is not list or len(saved) != 1:  # megatron-core saves the data of each object in a list
        raise CorruptCheckpointError(f"{what} holds {brief(saved)}, not a one-element list", path=path)
    return _args(saved[0], what, path)


def _args(common: Any, what: str, path: Path) -> dict[str, Any] | None:
    if type(common) is not dict:
        raise CorruptCheckpointError(f"{what} holds {brief(common)}, not a dict", path=path)
    if "args" not in common:
        return None
    try:
        return _fields(common["args"])
    except CorruptCheckpointError as exc:
        # common.pt is named by the path; the object, in a .distcp shared with tensors, by the message.
        message = exc.message if what == COMMON_FILE else f"{what}: {exc.message}"
        raise CorruptCheckpointError(message, path=path) from None


def read_run_config(folder: Path) -> dict[str, Any] | None:
    """The ``model`` section of Megatron-Bridge's ``folder/run_config.yaml`` as ``{field: plain value}`` (a nested
    ``transformer:`` mapping merged in); None when there is no such file.

    Raises:
        CorruptCheckpointError: The file is too large, not YAML, or has no ``model`` mapping.
    """
    return _model_section(Path(folder) / RUN_CONFIG_FILE, "model")


def read_nemo_model_yaml(folder: Path) -> dict[str, Any] | None:
    """The ``config`` section of NeMo 2's ``folder/context/model.yaml`` (the model's ``GPTConfig``: megatron-core
    ``TransformerConfig`` fields, as :func:`read_run_config` returns them); None when there is no such file.

    Raises:
        CorruptCheckpointError: The file is too large, not YAML, or has no ``config`` mapping.
    """
    return _model_section(Path(folder) / NEMO_MODEL_YAML, "config")


def read_nemo_tokenizer_name(folder: Path) -> str | None:
    """The folder, inside ``context/``, where NeMo 2 copied the model's tokenizer; None when it copied none.

    ``io_dump`` copies a tokenizer given as a local folder (the ``pretrained_model_name`` of NeMo's HF
    ``AutoTokenizer``) to ``context/<that folder's name>`` and records the name in ``model.yaml``'s
    ``tokenizer:`` (``nemo_tokenizer`` after NeMo's own HF import, else whatever the training run's folder was
    called); a tokenizer given as a Hub id is recorded as a mapping and nothing is copied. Only a single plain
    name is returned: that is all NeMo writes.

    Raises:
        CorruptCheckpointError: ``model.yaml`` is too large or not YAML.
    """
    tokenizer = read_nemo_tokenizer(folder)
    name = tokenizer.get("pretrained_model_name") if tokenizer is not None else None
    if type(name) is not str or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    return name


def read_nemo_tokenizer(folder: Path) -> dict[str, Any] | None:
    """The ``tokenizer:`` mapping of NeMo 2's ``folder/context/model.yaml`` (plain data; its ``_target_`` a string);
    None when there is no such file or mapping.

    Raises:
        CorruptCheckpointError: ``model.yaml`` is too large or not YAML.
    """
    config = _load_yaml(Path(folder) / NEMO_MODEL_YAML)
    tokenizer = config.get("tokenizer") if type(config) is dict else None
    return tokenizer if type(tokenizer) is dict else None


def _load_yaml(path: Path) -> Any:
    """The plain data of a bounded YAML file (None when there is no such file)."""
    import yaml  # PyYAML: a dependency of huggingface_hub; safe_load builds only plain data

    if not os.path.lexists(path):
        return None
    text = read_text(path, MAX_RUN_CONFIG_BYTES, what=path.name)
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{path.name} is not valid YAML ({brief(str(exc))})", path=path) from None


def _model_section(path: Path, section: str) -> dict[str, Any] | None:
    if not os.path.lexists(path):
        return None
    config = _load_yaml(path)
    model = config.get(section) if type(config) is dict else None
    if type(model) is not dict:
        raise CorruptCheckpointError(f"{path.name} has no {section}: mapping", path=path)
    nested = model.get("transformer")
    fields = {**(nested if type(nested) is dict else {}), **model}
    out = {k: v for k, v in fields.items() if type(k) is str and type(v) in _SCALARS}
    # The activation: a name in the newer form, {_target_: torch.nn.functional.silu, _call_: false} in the older.
    act = fields.get("activation_func")
    target = act.get("_target_") if type(act) is dict else act
    out["activation_func"] = target.rsplit(".", 1)[-1] if type(target) is str else None
    return out


__all__ = ["ALLOW", "COMMON_FILE", "COMMON_STATE_KEY", "MAX_COMMON_STATE_BYTES", "MAX_RUN_CONFIG_BYTES",
           "NEMO_MODEL_YAML", "RUN_CONFIG_FILE", "read_args", "read_common_state_args", "read_nemo_model_yaml",
           "read_nemo_tokenizer", "read_nemo_tokenizer_name", "read_run_config"]
