"""The vLLM load format ``consolidate``: serve a training checkpoint with no consolidated copy on disk.

Installed with the package, the entry point ``vllm.general_plugins: consolidate`` makes vLLM call
:func:`register` in each of its processes. It registers :data:`LOAD_FORMAT` with
``vllm.model_executor.model_loader.register_model_loader``, so that::

    vllm serve ./run/checkpoint-196 --load-format consolidate
    vllm serve s3://bucket/run/checkpoint-196 --load-format consolidate   # see .remote_model
    LLM(model="./run", load_format="consolidate")

load a DeepSpeed ZeRO checkpoint (a run folder, ``checkpoint-N``, a folder with ``latest``, a
``global_stepN``), and everything else ``vllm-consolidate convert`` reads (DCP / FSDP, verl, HF
folders), straight from its shards.

How a load goes:

1. Before vLLM reads the config (a guarded wrapper around ``EngineArgs.create_engine_config``, active
   only for ``load_format="consolidate"``), the input is resolved exactly as ``convert`` resolves it
   (:func:`~vllm_consolidate.plan.inputs.open_input`, metadata only), so a broken checkpoint (a missing
   rank, an unsafe pickle, a world-size mismatch) fails here,
   in one line, before vLLM starts an engine. vLLM reads ``config.json`` and the tokenizer from the
   folder it is given; when that folder has none (a run folder, a ``global_stepN``), the ones
   ``convert`` would copy (the checkpoint folder and its parents, nearest first) are passed to vLLM as
   ``hf_config_path`` / ``tokenizer`` / ``generation_config``. A config the reader built from the
   checkpoint's own record (a Megatron-LM run's args in ``common.pt``) exists on no disk: it is written
   to a private temporary folder (:func:`private_config_folder`) that is removed when the process exits.
   When there are none anywhere (a raw ``engine.save_checkpoint``), the error names the flags to pass.
2. In the engine, the loader plans the tensors with our name rules
   (:func:`~vllm_consolidate.plan.names.output_tensors` on vLLM's config: tied embeddings dropped,
   fused experts split) and streams each one from its byte ranges, floating tensors cast to vLLM's
   model dtype with :func:`~vllm_consolidate.casts.cast_into` (the casts ``convert --dtype`` writes),
   into ``model.load_weights`` one tensor at a time. Peak memory is vLLM's model plus the largest
   tensor plus two chunk buffers; no file is written and the checkpoint is only read. When the
   engine runs in the same process (``LLM()``), the metadata read in step 1 is reused.

Not served: LoRA runs (their merged tensors are computed, not stored; refused, pointing at
``convert`` and at vLLM's ``--enable-lora``), and Hub ids. An ``s3://``, ``gs://`` or ``az://`` model is
served by ranged reads, its config and tokenizer copied to a private temporary folder (:mod:`.remote_model`).

Not applied: quantization. The loader streams the checkpoint's unquantized tensors, so vLLM's
``--quantization`` (or a ``quantization_config`` in the config vLLM reads) is refused in one line before the
engine starts (:func:`refuse_quantization`), pointing at ``convert --quantize``, which writes the
compressed-tensors folder llm-compressor would (FP8 per channel or in 128x128 blocks, INT8), served without
``--load-format``. (Applying the same quantization while streaming is possible, since the writer does it a
block of rows at a time, but vLLM's quantized loaders expect the quantized tensors' own names and layouts;
left for later.)

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
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import ConfigNotFoundError, ConsolidateError, UsageError
from vllm_consolidate.read.assets import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    find_checkpoint_assets,
    has_tokenizer,
    tokenizer_names,
)
from vllm_consolidate.serve.remote_model import prepare_remote, private_config_folder
from vllm_consolidate.serve.weights import (  # re-exported: the plugin's public surface
    CONFIG_HINT,
    LOAD_FORMAT,
    TOKENIZER_HINT,
    Checkpoint,
    LoaderOptions,
    iter_weights,
    loader_options,
    object_url,
    open_checkpoint,
    plan_tensors,
    read_tensor,
    remember_checkpoint,
    served_config,
    take_checkpoint,
    with_config_base,
)
from vllm_consolidate.storage import remote

#: vLLM versions the plugin was tested with (the load tests run against these).
TESTED_VLLM_VERSIONS = ("0.32.0",)
#: A child of vLLM's logger, so our lines come out with vLLM's format wherever vLLM logs.
logger = logging.getLogger("vllm.consolidate")


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
    error = CheckpointLoadError(remote.public_error(exc))  # an object-store input's errors name URLs
    logger.error("%s", error)
    return error


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
    refuse_quantization(getattr(args, "quantization", None), str(args.model))
    options = with_config_base(loader_options(getattr(args, "model_loader_extra_config", None)),
                               getattr(args, "hf_config_path", None))
    if object_url(args.model, options) is not None:
        return _prepare_object_store(args, options)
    model = Path(str(args.model))
    checkpoint = open_checkpoint(model, options)
    remember_checkpoint(model, options, checkpoint)
    need_config = getattr(args, "hf_config_path", None) is None and not (model / CONFIG_FILE).is_file()
    need_tokenizer = (getattr(args, "tokenizer", None) is None and not getattr(args, "skip_tokenizer_init", False)
                      and not has_tokenizer(tokenizer_names(model)))
    need_generation = (getattr(args, "generation_config", None) == "auto"
                       and not (model / GENERATION_CONFIG_FILE).is_file())
    if not (need_config or need_tokenizer or need_generation):
        return {}
    detected = checkpoint.detected
    # A named base model (extra config, or vLLM's --hf-config-path) is searched last, as convert does.
    assets = find_checkpoint_assets(detected.weights_dir, model, checkpoint.source.asset_dirs, options.base_model_name)
    changes: dict[str, str] = {}
    if need_config:
        if checkpoint.source.config is not None:  # built by the reader (Megatron-LM's args): first on disk
            changes["hf_config_path"] = str(private_config_folder(served_config(checkpoint.source)))
        elif assets.config is None:
            raise ConfigNotFoundError("no config.json in the checkpoint or its parent folders", path=model,
                                      hint=CONFIG_HINT)
        else:
            changes["hf_config_path"] = str(assets.config.parent)
    if need_tokenizer:
        if assets.tokenizer_dir is None:
            raise ConfigNotFoundError("no tokenizer in the checkpoint or its parent folders", path=model,
                                   hint=TOKENIZER_HINT)
        changes["tokenizer"] = str(assets.tokenizer_dir)
    if need_generation and assets.generation_config is not None:
        changes["generation_config"] = str(assets.generation_config.parent)
    if "hf_config_path" in changes:  # the engine's loader will see this folder: keep the metadata under its key
        remember_checkpoint(model, with_config_base(options, changes["hf_config_path"]), checkpoint)
    for key, value in changes.items():
        setattr(args, key, value)
        how = "built from the Megatron-LM args in" if key == "hf_config_path" and checkpoint.source.config \
            else "found next to the checkpoint"
        logger.info("consolidate: %s=%s (%s %s)", key, value, how, detected.weights_dir)
    return changes


def _prepare_object_store(args: Any, options: Any) -> dict[str, Any]:
    """An ``s3://`` (``gs://``, ``az://``) model: see :mod:`.remote_model`. With ``input_url`` named in the
    extra config and a local ``--model`` folder (its config and tokenizer), the checkpoint is only checked."""
    if object_url(args.model, replace(options, input_url=None)) is not None:
        changes = prepare_remote(args, options)
        logger.info("consolidate: serving %s from object storage; config and tokenizer copied to %s, weights "
                    "streamed by ranged reads", changes["model_loader_extra_config"]["input_url"], changes["model"])
        return changes
    open_checkpoint(args.model, options).close()
    return {}


def refuse_quantization(method: Any, model: str | Path) -> None:
    """Refuse ``--quantization`` (or a config's quantization method): the loader streams unquantized tensors.

    Raises:
        UsageError: ``method`` is set.
    """
    if method is None:
        return
    raise UsageError(f"--load-format consolidate does not apply --quantization {method}: it streams the "
                     "checkpoint's unquantized weights", path=model,
                     hint="Write a quantized folder with vllm-consolidate convert --input CHECKPOINT --output FOLDER "
                          "--quantize fp8_dynamic|fp8_block|w8a8 and serve that folder (without --load-format), or "
                          "drop --quantization.")


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
            # The config folder the engine was given, as prepare_engine_args saw it (same options, same key).
            options = with_config_base(self.options, getattr(model_config, "hf_config_path", None))
            try:
                if prepared:
                    return take_checkpoint(model_config.model, options)
                return open_checkpoint(model_config.model, options)
            except ConsolidateError as exc:
                raise clean_error(exc) from None

        def download_model(self, model_config: Any) -> None:
            # Nothing to download (an object-store checkpoint is streamed too). Reading its metadata checks it.
            self._open(model_config).close()

        def load_model(self, vllm_config: Any, model_config: Any, *args: Any, **kwargs: Any) -> Any:
            try:  # also a quantization vLLM took from config.json (prepare_engine_args saw only the flag)
                refuse_quantization(getattr(model_config, "quantization", None), Path(str(model_config.model)))
            except ConsolidateError as exc:
                raise clean_error(exc) from None
            # Read the metadata before vLLM allocates the model: a broken checkpoint fails in seconds.
            self._checkpoint = self._open(model_config, prepared=True)
            try:
                return super().load_model(vllm_config, model_config, *args, **kwargs)
            finally:  # load_weights closed it, unless vLLM failed before (an object store's listing goes)
                if self._checkpoint is not None:
                    self._checkpoint.close()
                    self._checkpoint = None

        def load_weights(self, model: Any, model_config: Any) -> None:
            checkpoint, self._checkpoint = self._checkpoint or self._open(model_config), None
            started, stats = time.monotonic(), {}
            try:
                tensors = plan_tensors(checkpoint.source, _hf_config_dict(model_config))
                loaded = model.load_weights(iter_weights(tensors, model_config.dtype, stats))
            except ConsolidateError as exc:  # raised by a reader while vLLM pulls the tensors
                raise clean_error(exc) from None
            finally:
                checkpoint.close()
            logger.info("consolidate: streamed %d tensors (%.2f GB as %s) from %s (%s: %s) in %.2f s; nothing written",
                        stats["tensors"], stats["bytes"] / 1e9, model_config.dtype,
                        remote.public(str(checkpoint.detected.weights_dir)),
                        checkpoint.detected.kind, remote.public(checkpoint.detected.how), time.monotonic() - started)
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
