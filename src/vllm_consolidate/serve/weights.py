"""What the ``consolidate`` load format loads: the checkpoint, read as ``convert`` reads it, and its tensors
streamed one at a time from their byte ranges, cast to vLLM's model dtype (see :mod:`.vllm_plugin`).

A checkpoint in object storage (``input_url`` in the options, an ``s3://``, ``gs://`` or ``az://`` URL) is
read as ``convert --input URL`` reads it: listed into a private folder of empty stand-ins
(:func:`vllm_consolidate.storage.remote.mirror`), every byte a ranged GET; the :class:`Checkpoint` holds the
mirror, and :meth:`Checkpoint.close` removes it.

Nothing here imports vLLM; torch is imported only when a tensor is built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.casts import cast_into
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import UnsupportedCheckpointError, UsageError
from vllm_consolidate.plan.inputs import InputSpec, LoraMode, open_input
from vllm_consolidate.plan.names import output_tensors
from vllm_consolidate.read import detect as detection
from vllm_consolidate.read.gather import read_gathered
from vllm_consolidate.read.lora_find import holds_lora
from vllm_consolidate.read.ranges import OpenFiles, thread_buffer
from vllm_consolidate.source import SourceModel, TensorSpec, sub_segments
from vllm_consolidate.storage import remote
from vllm_consolidate.storage.store import parse_storage_options
from vllm_consolidate.storage.urls import is_object_url, parse_object_url
from vllm_consolidate.write.safetensors import WORKERS, chunk_elements  # threads and chunks as the writer's

#: The ``--load-format`` the plugin registers.
LOAD_FORMAT = "consolidate"
#: ``--model-loader-extra-config`` keys: ``type`` (``--type``), ``checkpoint_dir``, ``model_key`` and
#: ``base_model_name`` as in ``convert``; ``storage_options`` as ``--storage-options`` (a JSON object of obstore
#: settings). vLLM's own ``--hf-config-path`` stands for ``base_model_name`` when that is not given (see
#: :func:`with_config_base`). ``input_url``, the object-store URL served, is set by the plugin when
#: ``--model`` is a URL (:mod:`.remote_model`), so that the engine's processes read from it.
EXTRA_CONFIG_KEYS = ("type", "checkpoint_dir", "model_key", "base_model_name", "storage_options", "input_url")

CONFIG_HINT = (
    "vLLM reads config.json and the tokenizer from the folder it serves, and this checkpoint has none. "
    "Pass them: --hf-config-path BASE --tokenizer BASE (a folder or Hub id of the model you trained from; "
    "in Python hf_config_path=..., tokenizer=...), or consolidate first: "
    "vllm-consolidate convert --input CHECKPOINT --output FOLDER --base-model-name BASE"
)
TOKENIZER_HINT = (
    "Pass --tokenizer with the folder or Hub id of the model's tokenizer (Python: tokenizer=...), "
    "or --skip-tokenizer-init to serve token ids only."
)

LORA_HINT = (
    "Merge it into its base model first (vllm-consolidate convert --input CHECKPOINT --output FOLDER), or export "
    "the adapter (--lora adapter) and serve it on its base model with vLLM's --enable-lora."
)

# -- what to load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderOptions:
    """``--model-loader-extra-config`` of the ``consolidate`` format (all optional)."""

    input_type: str = "auto"
    checkpoint_dir: Path | None = None
    model_key: str | None = None
    base_model_name: str | None = None
    #: ``--storage-options`` as sorted pairs (hashable: options key :data:`_prepared`).
    storage_options: tuple[tuple[str, str], ...] = ()
    input_url: str | None = None

    def input_spec(self, model: str | os.PathLike) -> InputSpec:
        """Which input ``model`` with these options names (as ``convert --input model`` would)."""
        return InputSpec(Path(model), self.input_type, self.checkpoint_dir, self.model_key, self.base_model_name)


def with_config_base(options: LoaderOptions, hf_config_path: Any) -> LoaderOptions:
    """``options`` with vLLM's ``--hf-config-path`` as the base model when none is named.

    A checkpoint whose tensor names need the model's config to be read (a bare Megatron ``torch_dist`` save,
    whose layout comes from ``--base-model-name`` in ``convert``) is served with vLLM's own option for the
    config: the folder it names is where the reader finds the layout too. Formats that need no config
    ignore it (``read.detect.read``).
    """
    if options.base_model_name is not None or not hf_config_path:
        return options
    return replace(options, base_model_name=str(hf_config_path))


def loader_options(extra: Any) -> LoaderOptions:
    """Parse ``model_loader_extra_config``: ``{"type": ..., "checkpoint_dir": ..., "model_key": ...,
    "base_model_name": ...}``.

    Raises:
        UsageError: Not a dict, or a key this format does not know.
    """
    if extra is None:
        return LoaderOptions()
    if not isinstance(extra, dict):
        raise UsageError(f"--model-loader-extra-config must be a JSON object for --load-format {LOAD_FORMAT}")
    unknown = sorted(set(extra) - set(EXTRA_CONFIG_KEYS))
    if unknown:
        raise UsageError(f"unknown --model-loader-extra-config keys for --load-format {LOAD_FORMAT}: "
                         f"{', '.join(map(str, unknown))}", hint=f"Known keys: {', '.join(EXTRA_CONFIG_KEYS)}.")
    checkpoint_dir = extra.get("checkpoint_dir")
    base = extra.get("base_model_name")
    url = extra.get("input_url")
    if url is not None and not is_object_url(url):
        raise UsageError(f"input_url in --model-loader-extra-config must be an object-store URL, not {url!r}",
                         hint="Serve an s3://, gs:// or az:// checkpoint with --model URL.")
    if url is not None:
        parse_object_url(url)  # a bad URL fails here, in one line
    return LoaderOptions(input_type=str(extra.get("type") or "auto"),
                         checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
                         model_key=extra.get("model_key"), base_model_name=str(base) if base else None,
                         storage_options=_storage_options(extra.get("storage_options")), input_url=url)


def _storage_options(value: Any) -> tuple[tuple[str, str], ...]:
    """``storage_options`` (a JSON object, or its text) checked as ``--storage-options`` is."""
    if value is None:
        return ()
    text = value if isinstance(value, str) else json.dumps(value)
    return tuple(sorted(parse_storage_options(text).items()))


@dataclass
class Checkpoint:
    """An input resolved and read (metadata only), as ``convert`` does it."""

    detected: detection.DetectedInput
    source: SourceModel
    #: The object-store listing the checkpoint is read through (None for a local one).
    mirror: remote.Mirror | None = None

    def close(self) -> None:
        """Remove the mirror's stand-in folder (a local checkpoint holds nothing to close)."""
        if self.mirror is not None:
            self.mirror.close()


def object_url(model: str | os.PathLike, options: LoaderOptions) -> str | None:
    """The object-store URL to serve: ``input_url``, else ``model`` when it is one; None for a local path."""
    if options.input_url:
        return options.input_url
    return os.fspath(model) if is_object_url(os.fspath(model)) else None


def open_checkpoint(model: str | os.PathLike, options: LoaderOptions = LoaderOptions()) -> Checkpoint:
    """Resolve ``model`` (run folder, ``checkpoint-N``, ``latest``, ``global_stepN``, DCP, verl, HF) and read it.

    With an object-store URL (``options.input_url``, or ``model`` itself) the prefix is listed and read by
    ranged GETs; the checkpoint then holds the listing until :meth:`Checkpoint.close`, and errors name URLs.

    Raises:
        ConsolidateError: Nothing loadable is there, or the checkpoint is broken or unsafe.
    """
    url = object_url(model, options)
    if url is None:
        return _checked(*open_input(options.input_spec(model), LoraMode.AS_READ))
    view = remote.mirror(parse_object_url(url), dict(options.storage_options))
    try:
        local = replace(options, checkpoint_dir=view.local(options.checkpoint_dir))
        return _checked(*open_input(local.input_spec(view.path), LoraMode.AS_READ), mirror=view)
    except BaseException as exc:
        view.close()
        remote.public_error(exc)
        raise


def _checked(detected: detection.DetectedInput, source: SourceModel, mirror: remote.Mirror | None = None,
             ) -> Checkpoint:
    if holds_lora(detected.kind, source):
        raise UnsupportedCheckpointError(
            "this is a LoRA fine-tune; the consolidate load format serves full models only",
            path=detected.weights_dir, hint=LORA_HINT)
    return Checkpoint(detected, source, mirror)


#: What :func:`prepare_engine_args` read, for the loader when the engine runs in the same process
#: (``LLM()``, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): taken once, so each load reads the metadata once.
_prepared: dict[tuple[str, LoaderOptions], Checkpoint] = {}


def _key(model: str | os.PathLike, options: LoaderOptions) -> tuple[str, LoaderOptions]:
    return os.path.abspath(os.fspath(model)), options


def remember_checkpoint(model: str | os.PathLike, options: LoaderOptions, checkpoint: Checkpoint) -> None:
    """Keep what was read before the engine started, for :func:`take_checkpoint` in the same process."""
    for old in _prepared.values():
        if old is not checkpoint:
            old.close()
    _prepared.clear()  # one engine at a time: never keep the metadata of an earlier one
    _prepared[_key(model, options)] = checkpoint


def take_checkpoint(model: str | os.PathLike, options: LoaderOptions) -> Checkpoint:
    """The checkpoint read for this engine's arguments in this process, else read it now."""
    found = _prepared.pop(_key(model, options), None)
    return found if found is not None else open_checkpoint(model, options)


def served_config(source: SourceModel) -> dict[str, Any]:
    """The config a reader built, with the precision the weights were stored in (vLLM's ``--dtype auto``)."""
    config = dict(source.config or {})
    stored = source.trained_dtype.name if source.trained_dtype is not None else source.info.get("stored_dtype")
    if stored and "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = stored
    return config


def plan_tensors(source: SourceModel, config: dict) -> list[TensorSpec]:
    """The tensors to hand to vLLM, under their output names (``convert``'s rules for ``config``)."""
    tensors, _dropped = output_tensors(source, config)
    return tensors


def out_dtype(spec: TensorSpec, model_dtype: DType) -> DType:
    """Floating tensors take the model's dtype; integer and bool tensors keep theirs."""
    return model_dtype if spec.dtype.is_floating_point else spec.dtype


def _chunk_jobs(spec: TensorSpec, dst: DType) -> list[tuple[int, int]]:
    """``(first element, count)`` chunks of one tensor, sized as the writer sizes them."""
    step = chunk_elements(spec.dtype, dst)
    return [(first, min(step, spec.numel - first)) for first in range(0, spec.numel, step)]


def _fill(files: OpenFiles, spec: TensorSpec, dst: DType, out: memoryview, first: int, count: int) -> None:
    """Read elements ``[first, first + count)`` of ``spec`` into ``out`` (the output's bytes), cast to ``dst``."""
    src_size, dst_size = spec.dtype.itemsize, dst.itemsize
    target = out[first * dst_size:(first + count) * dst_size]
    # Gathered as convert's writer reads: a TP row-parallel weight is many small ranges, few runs per rank file.
    ranges = list(sub_segments(spec.segments, first * src_size, count * src_size))
    if dst == spec.dtype:
        read_gathered(files, target, ranges)
        return
    buf = thread_buffer(count * src_size)
    read_gathered(files, buf, ranges)
    cast_into(buf, spec.dtype, dst, target)


def read_tensor(spec: TensorSpec, dst: DType, files: OpenFiles, pool: ThreadPoolExecutor | None = None) -> Any:
    """One tensor as a new CPU ``torch.Tensor`` of dtype ``dst``, read from its byte ranges.

    Raises:
        CorruptCheckpointError: A file ends before the tensor does.
    """
    import torch

    if getattr(spec, "delta", None) is not None:  # a computed tensor (LoRA merge): never from byte ranges alone
        raise UnsupportedCheckpointError(f"{spec.name} is computed (a LoRA merge), not stored", hint=LORA_HINT)
    tensor = torch.empty(spec.shape, dtype=dst.torch)
    if spec.numel == 0:
        return tensor
    out = memoryview(tensor.view(-1).view(torch.uint8).numpy()).cast("B")
    jobs = _chunk_jobs(spec, dst)
    if pool is None or len(jobs) == 1:
        for first, count in jobs:
            _fill(files, spec, dst, out, first, count)
    else:
        for future in [pool.submit(_fill, files, spec, dst, out, first, count) for first, count in jobs]:
            future.result()
    return tensor


def iter_weights(tensors: list[TensorSpec], model_dtype: Any, stats: dict[str, Any] | None = None,
                 ) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` for each planned tensor, read one at a time; what ``model.load_weights`` takes.

    Only the tensor being handed over is alive here (the caller drops it before asking for the next).

    Args:
        tensors: The plan (:func:`plan_tensors`).
        model_dtype: vLLM's model dtype (a torch dtype); floating tensors are cast to it.
        stats: Filled with ``tensors``, ``bytes_read`` and ``bytes`` (handed over) as it goes.
    """
    target = dtypes.of(model_dtype)
    stats = stats if stats is not None else {}
    stats.update(tensors=0, bytes_read=0, bytes=0)
    files = OpenFiles()
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="vllmc-serve") if WORKERS > 1 else None
    try:
        for spec in tensors:
            dst = out_dtype(spec, target)
            tensor = read_tensor(spec, dst, files, pool)
            stats["tensors"] += 1
            stats["bytes_read"] += spec.nbytes
            stats["bytes"] += spec.numel * dst.itemsize
            yield spec.name, tensor
            del tensor
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        files.close()


__all__ = ["CONFIG_HINT", "EXTRA_CONFIG_KEYS", "LOAD_FORMAT", "LORA_HINT", "TOKENIZER_HINT", "Checkpoint",
           "LoaderOptions", "iter_weights", "loader_options", "object_url", "open_checkpoint", "out_dtype",
           "plan_tensors", "read_tensor", "remember_checkpoint", "served_config", "take_checkpoint"]
