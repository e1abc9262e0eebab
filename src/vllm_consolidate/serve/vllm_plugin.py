"""The vLLM load format ``consolidate``: serve a training checkpoint with no consolidated copy on disk.

Installed with the package, the entry point ``vllm.general_plugins: consolidate`` makes vLLM call
:func:`register` in each of its processes. It registers :data:`LOAD_FORMAT` with
``vllm.model_executor.model_loader.register_model_loader``, so that::

    vllm serve ./run/checkpoint-196 --load-format consolidate
    LLM(model="./run", load_format="consolidate")

load a DeepSpeed ZeRO checkpoint (a run folder, ``checkpoint-N``, a folder with ``latest``, a
``global_stepN``), and everything else ``vllm-consolidate convert`` reads (DCP / FSDP, verl, HF
folders), straight from its shards.

How a load goes:

1. Before vLLM reads the config (a guarded wrapper around ``EngineArgs.create_engine_config``, active
   only for ``load_format="consolidate"``), the input is resolved exactly as ``convert`` resolves it
   (:func:`~vllm_consolidate.read.detect.detect` + :func:`~vllm_consolidate.read.detect.read`, metadata
   only), so a broken checkpoint (a missing rank, an unsafe pickle, a world-size mismatch) fails here,
   in one line, before vLLM starts an engine. vLLM reads ``config.json`` and the tokenizer from the
   folder it is given; when that folder has none (a run folder, a ``global_stepN``), the ones
   ``convert`` would copy (the checkpoint folder and its parents, nearest first) are passed to vLLM as
   ``hf_config_path`` / ``tokenizer`` / ``generation_config``. When there are none anywhere (a raw
   ``engine.save_checkpoint``), the error names the flags to pass.
2. In the engine, the loader plans the tensors with our name rules
   (:func:`~vllm_consolidate.plan.names.output_tensors` on vLLM's config: tied embeddings dropped,
   fused experts split) and streams each one from its byte ranges, floating tensors cast to vLLM's
   model dtype with :func:`~vllm_consolidate.casts.cast_into` (the casts ``convert --dtype`` writes),
   into ``model.load_weights`` one tensor at a time. Peak memory is vLLM's model plus the largest
   tensor plus two chunk buffers; no file is written and the checkpoint is only read.

Errors: every :class:`~vllm_consolidate.errors.ConsolidateError` reaches the user as
:class:`CheckpointLoadError`, whose text is the CLI's one line ``error: <message> [<path>]; hint:
<hint>`` (logged as one line too), raised ``from None`` so no reader frames are chained to it.

Versions: written against vLLM 0.32.0 (:data:`TESTED_VLLM_VERSIONS`). When vLLM's loader API is not
the one this module uses (no ``register_model_loader``, or ``BaseModelLoader`` methods with other
parameters) :func:`register` logs one warning and registers nothing; it never raises, so other
models are served as before.

This module imports neither vLLM nor torch at import time (the package must import without them).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.casts import cast_into
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import ConfigNotFoundError, ConsolidateError, UnsupportedCheckpointError, UsageError
from vllm_consolidate.plan.names import output_tensors
from vllm_consolidate.read import detect as detection
from vllm_consolidate.read.assets import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    find_checkpoint_assets,
    has_tokenizer,
    tokenizer_names,
)
from vllm_consolidate.read.ranges import OpenFiles, read_into, thread_buffer
from vllm_consolidate.source import SourceModel, TensorSpec, sub_segments

#: The ``--load-format`` this plugin registers.
LOAD_FORMAT = "consolidate"
#: vLLM versions the plugin was tested with (the load tests run against these).
TESTED_VLLM_VERSIONS = ("0.32.0",)
#: ``--model-loader-extra-config`` keys: ``type`` (``--type``), ``checkpoint_dir``, ``model_key`` as in ``convert``.
EXTRA_CONFIG_KEYS = ("type", "checkpoint_dir", "model_key")
#: Source bytes per chunk of a cast (as the writer: a chunk and its result stay near the core's cache).
CAST_CHUNK_BYTES = 4 * 2**20
#: Bytes per chunk of a plain copy.
COPY_CHUNK_BYTES = 16 * 2**20
#: Threads that read and cast the chunks of one tensor (numpy and preadv release the GIL).
WORKERS = 2

#: A child of vLLM's logger, so our lines come out with vLLM's format wherever vLLM logs.
logger = logging.getLogger("vllm.consolidate")

CONFIG_HINT = (
    "vLLM reads config.json and the tokenizer from the folder it serves, and this checkpoint has none. "
    "Pass them: --hf-config-path BASE --tokenizer BASE (a folder or Hub id of the model you trained from; "
    "in Python hf_config_path=..., tokenizer=...), or consolidate first: "
    "vllm-consolidate convert --input CHECKPOINT --output FOLDER --base-model-name BASE"
)
LORA_HINT = (
    "Merge it into its base model first (vllm-consolidate convert --input CHECKPOINT --output FOLDER), or export "
    "the adapter (--lora adapter) and serve it on its base model with vLLM's --enable-lora."
)
#: A LoRA factor's name (peft's live and saved naming); such a checkpoint needs a merge, not a stream.
_LORA_NAME = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B)(?:\.|$)")
TOKENIZER_HINT = (
    "Pass --tokenizer with the folder or Hub id of the model's tokenizer (Python: tokenizer=...), "
    "or --skip-tokenizer-init to serve token ids only."
)


class CheckpointLoadError(RuntimeError):
    """A :class:`~vllm_consolidate.errors.ConsolidateError` on its way out of vLLM, as one line.

    Attributes:
        error: The original error (``.message``, ``.path``, ``.hint``).
    """

    def __init__(self, error: ConsolidateError):
        super().__init__(one_line(error))
        self.error = error


def one_line(exc: ConsolidateError) -> str:
    """``error: <message> [<path>]; hint: <hint>``: what the CLI prints on two lines, on one."""
    text = f"error: {exc}"
    if exc.hint:
        text += f"; hint: {exc.hint}"
    return " ".join(text.split())


def clean_error(exc: ConsolidateError) -> CheckpointLoadError:
    """The error to raise (``raise clean_error(exc) from None``) for ``exc``, its line logged as vLLM logs errors."""
    error = CheckpointLoadError(exc)
    logger.error("%s", error)
    return error


# -- what to load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderOptions:
    """``--model-loader-extra-config`` of the ``consolidate`` format (all optional)."""

    input_type: str = "auto"
    checkpoint_dir: Path | None = None
    model_key: str | None = None


def loader_options(extra: Any) -> LoaderOptions:
    """Parse ``model_loader_extra_config``: ``{"type": ..., "checkpoint_dir": ..., "model_key": ...}``.

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
    return LoaderOptions(input_type=str(extra.get("type") or "auto"),
                         checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
                         model_key=extra.get("model_key"))


@dataclass
class Checkpoint:
    """An input resolved and read (metadata only), as ``convert`` does it."""

    detected: detection.DetectedInput
    source: SourceModel


def open_checkpoint(model: str | os.PathLike, options: LoaderOptions = LoaderOptions()) -> Checkpoint:
    """Resolve ``model`` (run folder, ``checkpoint-N``, ``latest``, ``global_stepN``, DCP, verl, HF) and read it.

    Raises:
        ConsolidateError: Nothing loadable is there, or the checkpoint is broken or unsafe.
    """
    detected = detection.detect(Path(model), options.input_type, options.checkpoint_dir)
    source = detection.read(detected, options.model_key)
    if source.kind == "peft" or any(_LORA_NAME.search(t.name) for t in source.tensors):
        raise UnsupportedCheckpointError(
            "this is a LoRA fine-tune; the consolidate load format serves full models only",
            path=detected.weights_dir, hint=LORA_HINT)
    return Checkpoint(detected, source)


#: What :func:`prepare_engine_args` read, for the loader when the engine runs in the same process
#: (``LLM()``, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): taken once, so each load reads the metadata once.
_prepared: dict[tuple[str, LoaderOptions], Checkpoint] = {}


def _key(model: str | os.PathLike, options: LoaderOptions) -> tuple[str, LoaderOptions]:
    return os.path.abspath(os.fspath(model)), options


def take_checkpoint(model: str | os.PathLike, options: LoaderOptions) -> Checkpoint:
    """The checkpoint read for this engine's arguments in this process, else read it now."""
    found = _prepared.pop(_key(model, options), None)
    return found if found is not None else open_checkpoint(model, options)


def plan_tensors(source: SourceModel, config: dict) -> list[TensorSpec]:
    """The tensors to hand to vLLM, under their output names (``convert``'s rules for ``config``)."""
    tensors, _dropped = output_tensors(source, config)
    return tensors


def out_dtype(spec: TensorSpec, model_dtype: DType) -> DType:
    """Floating tensors take the model's dtype; integer and bool tensors keep theirs."""
    return model_dtype if spec.dtype.is_floating_point else spec.dtype


def _chunk_jobs(spec: TensorSpec, dst: DType) -> list[tuple[int, int]]:
    """``(first element, count)`` chunks of one tensor."""
    budget = COPY_CHUNK_BYTES if dst == spec.dtype else CAST_CHUNK_BYTES
    step = max(1, budget // max(spec.dtype.itemsize, dst.itemsize))
    return [(first, min(step, spec.numel - first)) for first in range(0, spec.numel, step)]


def _fill(files: OpenFiles, spec: TensorSpec, dst: DType, out: memoryview, first: int, count: int) -> None:
    """Read elements ``[first, first + count)`` of ``spec`` into ``out`` (the output's bytes), cast to ``dst``."""
    src_size, dst_size = spec.dtype.itemsize, dst.itemsize
    target = out[first * dst_size:(first + count) * dst_size]
    ranges = sub_segments(spec.segments, first * src_size, count * src_size)
    if dst == spec.dtype:
        read_into(files, target, ranges)
        return
    buf = thread_buffer(count * src_size)
    read_into(files, buf, ranges)
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


def _hf_config_dict(model_config: Any) -> dict:
    """vLLM's model config as a dict (tying and the MoE layout are decided from what vLLM built the model with)."""
    config = model_config.hf_config
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


# -- config and tokenizer, before vLLM reads them -----------------------------------------------------


def prepare_engine_args(args: Any) -> dict[str, str]:
    """Check the checkpoint and point vLLM at its config, tokenizer and generation config when it needs them.

    Runs in the process that parses the engine arguments, before vLLM reads ``config.json``. Fills
    only what the user left unset and the served folder lacks, with what ``convert`` would copy.

    Args:
        args: vLLM's ``EngineArgs`` (``model``, ``hf_config_path``, ``tokenizer``, ``generation_config``,
            ``skip_tokenizer_init``, ``model_loader_extra_config``); changed in place.

    Returns:
        ``{engine argument: value}`` that were set.

    Raises:
        ConsolidateError: The checkpoint cannot be read, or has no config (or tokenizer) vLLM could use.
    """
    model = Path(str(args.model))
    options = loader_options(getattr(args, "model_loader_extra_config", None))
    checkpoint = open_checkpoint(model, options)
    _prepared.clear()  # one engine at a time: never keep the metadata of an earlier one
    _prepared[_key(model, options)] = checkpoint
    need_config = getattr(args, "hf_config_path", None) is None and not (model / CONFIG_FILE).is_file()
    need_tokenizer = (getattr(args, "tokenizer", None) is None and not getattr(args, "skip_tokenizer_init", False)
                      and not has_tokenizer(tokenizer_names(model)))
    need_generation = (getattr(args, "generation_config", None) == "auto"
                       and not (model / GENERATION_CONFIG_FILE).is_file())
    if not (need_config or need_tokenizer or need_generation):
        return {}
    detected = checkpoint.detected
    assets = find_checkpoint_assets(detected.weights_dir, model, checkpoint.source.asset_dirs, None)
    changes: dict[str, str] = {}
    if need_config:
        if assets.config is None:
            raise ConfigNotFoundError("no config.json in the checkpoint or its parent folders", path=model,
                                      hint=CONFIG_HINT)
        changes["hf_config_path"] = str(assets.config.parent)
    if need_tokenizer:
        if assets.tokenizer_dir is None:
            raise ConsolidateError("no tokenizer in the checkpoint or its parent folders", path=model,
                                   hint=TOKENIZER_HINT)
        changes["tokenizer"] = str(assets.tokenizer_dir)
    if need_generation and assets.generation_config is not None:
        changes["generation_config"] = str(assets.generation_config.parent)
    for key, value in changes.items():
        setattr(args, key, value)
        logger.info("consolidate: %s=%s (found next to the checkpoint %s)", key, value, detected.weights_dir)
    return changes


# -- registration -------------------------------------------------------------------------------------

_state = {"registered": False, "warned": False}


def _params(func: Any) -> list[str]:
    return [p.name for p in inspect.signature(func).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


#: ``BaseModelLoader`` methods this plugin implements or calls, with the parameters it passes.
_EXPECTED_METHODS = {
    "__init__": ["self", "load_config"],
    "download_model": ["self", "model_config"],
    "load_weights": ["self", "model", "model_config"],
    "load_model": ["self", "vllm_config", "model_config"],
}


def api_problem(register_model_loader: Any, base: Any) -> str | None:
    """What in vLLM's loader API differs from what this plugin uses, or None when it matches."""
    if not callable(register_model_loader):
        return "vllm.model_executor.model_loader has no register_model_loader"
    if not isinstance(base, type):
        return "vllm.model_executor.model_loader has no BaseModelLoader class"
    try:
        if _params(register_model_loader)[:1] != ["load_format"]:
            return f"register_model_loader{inspect.signature(register_model_loader)} does not take load_format"
        for name, expected in _EXPECTED_METHODS.items():
            method = getattr(base, name, None)
            if method is None:
                return f"BaseModelLoader has no {name}()"
            got = _params(method)
            if got[:len(expected)] != expected:
                return f"BaseModelLoader.{name}{inspect.signature(method)} is not ({', '.join(expected)}, ...)"
    except (TypeError, ValueError) as exc:  # a signature inspect cannot read
        return f"cannot inspect vLLM's loader API ({exc})"
    return None


def _loader_class(base: type) -> type:
    """The loader class, made on a vLLM ``BaseModelLoader`` (so this module imports without vLLM)."""

    class ConsolidateModelLoader(base):  # type: ignore[misc, valid-type]
        """Streams a training checkpoint's tensors into vLLM (see :mod:`vllm_consolidate.serve.vllm_plugin`)."""

        def __init__(self, load_config: Any):
            super().__init__(load_config)
            try:
                self.options = loader_options(getattr(load_config, "model_loader_extra_config", None))
            except ConsolidateError as exc:
                raise clean_error(exc) from None
            self._checkpoint: Checkpoint | None = None

        def _open(self, model_config: Any, *, prepared: bool = False) -> Checkpoint:
            try:
                if prepared:
                    return take_checkpoint(model_config.model, self.options)
                return open_checkpoint(model_config.model, self.options)
            except ConsolidateError as exc:
                raise clean_error(exc) from None

        def download_model(self, model_config: Any) -> None:
            # Nothing to download: the checkpoint is local. Reading its metadata checks it.
            self._open(model_config)

        def load_model(self, vllm_config: Any, model_config: Any, *args: Any, **kwargs: Any) -> Any:
            # Read the metadata before vLLM allocates the model: a broken checkpoint fails in seconds.
            self._checkpoint = self._open(model_config, prepared=True)
            return super().load_model(vllm_config, model_config, *args, **kwargs)

        def load_weights(self, model: Any, model_config: Any) -> None:
            checkpoint, self._checkpoint = self._checkpoint or self._open(model_config), None
            started, stats = time.monotonic(), {}
            try:
                tensors = plan_tensors(checkpoint.source, _hf_config_dict(model_config))
                loaded = model.load_weights(iter_weights(tensors, model_config.dtype, stats))
            except ConsolidateError as exc:  # raised by a reader while vLLM pulls the tensors
                raise clean_error(exc) from None
            logger.info("consolidate: streamed %d tensors (%.2f GB as %s) from %s (%s: %s) in %.2f s; nothing written",
                        stats["tensors"], stats["bytes"] / 1e9, model_config.dtype, checkpoint.detected.weights_dir,
                        checkpoint.detected.kind, checkpoint.detected.how, time.monotonic() - started)
            _track_weights(self, model, model_config, loaded)

    return ConsolidateModelLoader


def _track_weights(loader: Any, model: Any, model_config: Any, loaded: Any) -> None:
    """vLLM's own check that every parameter was loaded (``DefaultModelLoader.track_weights_loading``)."""
    if loaded is None or getattr(model_config, "quantization", None) is not None:
        return
    try:
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
        track = DefaultModelLoader.track_weights_loading
    except (ImportError, AttributeError):
        return
    track(loader, model, loaded)


def _patch_engine_args() -> None:
    """Wrap ``EngineArgs.create_engine_config`` to run :func:`prepare_engine_args` for our format only."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_vllm_consolidate", False):
        return

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "load_format", None) == LOAD_FORMAT:
            try:
                prepare_engine_args(self)
            except ConsolidateError as exc:
                raise clean_error(exc) from None
            except Exception as exc:  # a bug of ours must not stop vLLM; the loader checks again
                logger.warning("consolidate: could not check the checkpoint before loading (%s: %s)",
                               type(exc).__name__, exc)
        return original(self, *args, **kwargs)

    create_engine_config._vllm_consolidate = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def _register() -> str | None:
    """Register the loader; return why not when vLLM's API is not the one we use."""
    import vllm
    from vllm.model_executor import model_loader

    register_model_loader = getattr(model_loader, "register_model_loader", None)
    base = getattr(model_loader, "BaseModelLoader", None)
    problem = api_problem(register_model_loader, base)
    if problem is not None:
        return f"{problem} (vLLM {getattr(vllm, '__version__', '?')})"
    assert base is not None and register_model_loader is not None
    register_model_loader(LOAD_FORMAT)(_loader_class(base))
    version = getattr(vllm, "__version__", "?")
    if version not in TESTED_VLLM_VERSIONS:
        logger.info("consolidate: vLLM %s is not among the tested versions (%s)", version,
                    ", ".join(TESTED_VLLM_VERSIONS))
    try:
        _patch_engine_args()
    except Exception as exc:  # the loader still works for folders that hold config.json and a tokenizer
        logger.info("consolidate: config.json of a run folder will not be found for vLLM (%s: %s)",
                    type(exc).__name__, exc)
    return None


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register :data:`LOAD_FORMAT` with vLLM.

    Safe to call more than once and in every vLLM process. Never raises: when vLLM's loader API is
    not the one this plugin was written for, it logs one warning and registers nothing.
    """
    if _state["registered"]:
        return
    try:
        problem = _register()
    except Exception as exc:  # an import error or a changed vLLM must not break `vllm serve`
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        _state["registered"] = True
        return
    if not _state["warned"]:
        _state["warned"] = True
        logger.warning("vllm-consolidate: load format '%s' not registered: %s. Serve a folder written by "
                       "`vllm-consolidate convert` instead (tested with vLLM %s).", LOAD_FORMAT, problem,
                       ", ".join(TESTED_VLLM_VERSIONS))


__all__ = [
    "CheckpointLoadError", "LOAD_FORMAT", "LoaderOptions", "TESTED_VLLM_VERSIONS", "api_problem", "iter_weights",
    "loader_options", "one_line", "open_checkpoint", "plan_tensors", "prepare_engine_args", "read_tensor", "register",
]
