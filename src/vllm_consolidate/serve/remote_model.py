"""Serving a checkpoint that lives in object storage: ``--model s3://bucket/prefix --load-format consolidate``.

vLLM 0.32 treats an ``s3://``, ``gs://`` or ``az://`` model itself, in ``ModelConfig``: it pulls the prefix's
``*.json`` (and tokenizer) files with the ``runai_model_streamer`` package into its cache, and then
``VllmConfig`` refuses every load format but ``runai_streamer``, ``runai_streamer_sharded`` and
``modelexpress`` (which stream existing safetensors files, not training checkpoints). So the plugin
replaces such a model before vLLM sees it, in the same wrapper of ``EngineArgs.create_engine_config``
that finds a run folder's config (:func:`prepare_remote`):

* The prefix is listed and the checkpoint's metadata read, as ``convert --input URL`` does (ranged GETs;
  :func:`~vllm_consolidate.serve.weights.open_checkpoint`), so a missing rank object or a bad URL fails
  here, in one line naming the URL, before an engine starts.
* The config, generation config and tokenizer files ``convert`` would copy (found in the prefix and its
  two parent prefixes, or the named base model) are copied, bounded as ``convert`` copies them, into a
  private temporary folder (mode 0700, removed when the process exits). That folder becomes vLLM's
  ``model``; no weight byte is written to it.
* The URL goes to the engine in ``model_loader_extra_config["input_url"]`` (with ``storage_options``,
  if given), and becomes the served model name when none is set. The loader, in whichever process the
  engine runs, lists the prefix again and streams each tensor from its byte ranges.

Credentials and the endpoint come from the environment (``AWS_*`` ...), as for ``convert``; the extra
config's ``storage_options`` add obstore settings. vLLM logs its non-default arguments (the extra config
among them), so secrets belong in the environment.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import ConfigNotFoundError, ConsolidateError, UsageError
from vllm_consolidate.read.assets import CONFIG_FILE, GENERATION_CONFIG_FILE, find_checkpoint_assets, read_config
from vllm_consolidate.serve.weights import (
    CONFIG_HINT,
    TOKENIZER_HINT,
    Checkpoint,
    LoaderOptions,
    open_checkpoint,
    served_config,
)
from vllm_consolidate.storage import remote
from vllm_consolidate.write.assets import copy_regular


def private_folder(prefix: str) -> Path:
    """A new private folder (mode 0700) that is removed when this process exits.

    vLLM's engine processes get the parsed config, never this path, so it may go with the process that
    parsed the arguments.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def private_config_folder(config: dict[str, Any]) -> Path:
    """A new private folder holding ``config`` as ``config.json``, for vLLM's ``hf_config_path``.

    vLLM reads a config only from a folder, and a config the reader built from the checkpoint's own
    record exists nowhere on disk; the input is never written to.
    """
    folder = private_folder("vllm-consolidate-config-")
    _write_config(folder, config)
    return folder


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def prepare_remote(args: Any, options: LoaderOptions) -> dict[str, Any]:
    """Point vLLM's engine arguments for an object-store model at a local folder of its config and tokenizer.

    Args:
        args: vLLM's ``EngineArgs`` whose ``model`` is an object-store URL (changed in place: ``model``,
            ``model_loader_extra_config``, ``served_model_name``).
        options: The parsed ``model_loader_extra_config``.

    Returns:
        ``{engine argument: value}`` that were set.

    Raises:
        ConsolidateError: The URL or the checkpoint behind it cannot be read, or has no config (or
            tokenizer) vLLM could use; messages name the URL.
    """
    url = str(args.model)
    if options.input_url and options.input_url != url:
        raise UsageError(f"--model {url} and input_url {options.input_url} in --model-loader-extra-config differ",
                         hint="Name the checkpoint once, as --model URL.")
    checkpoint = open_checkpoint(url, options)
    try:
        folder = _local_model(args, checkpoint, options, url)
    except ConsolidateError as exc:
        remote.public_error(exc)
        raise
    finally:
        checkpoint.close()
    extra = dict(getattr(args, "model_loader_extra_config", None) or {})
    changes: dict[str, Any] = {"model": str(folder), "model_loader_extra_config": {**extra, "input_url": url}}
    changes.update({key: None for key in ("hf_config_path", "tokenizer") if getattr(args, key, None) == url})
    if not getattr(args, "served_model_name", None):
        changes["served_model_name"] = url
    for key, value in changes.items():
        setattr(args, key, value)
    return changes


def _local_model(args: Any, checkpoint: Checkpoint, options: LoaderOptions, url: str) -> Path:
    """The private folder vLLM is pointed at: what of config, generation config and tokenizer it needs."""
    assert checkpoint.mirror is not None
    source = checkpoint.source
    assets = find_checkpoint_assets(checkpoint.detected.weights_dir, checkpoint.mirror.path, source.asset_dirs,
                                    options.base_model_name)
    # The URL named again as the tokenizer (or config) means the checkpoint's own: vLLM cannot read a URL there.
    need_config = getattr(args, "hf_config_path", None) in (None, url)
    need_tokenizer = (getattr(args, "tokenizer", None) in (None, url)
                      and not getattr(args, "skip_tokenizer_init", False))
    if need_config and source.config is None and assets.config is None:
        raise ConfigNotFoundError("no config.json in the checkpoint or its parent prefixes", path=url,
                                  hint=CONFIG_HINT)
    if need_tokenizer and assets.tokenizer_dir is None:
        raise ConfigNotFoundError("no tokenizer in the checkpoint or its parent prefixes", path=url,
                                  hint=TOKENIZER_HINT)
    folder = private_folder("vllm-consolidate-model-")
    if need_config:  # a config the reader built (Megatron-LM's args) comes first, as for a local checkpoint
        assert assets.config is not None or source.config is not None
        _write_config(folder, served_config(source) if source.config is not None else read_config(assets.config))
    if getattr(args, "generation_config", None) == "auto" and assets.generation_config is not None:
        copy_regular(assets.generation_config, folder / GENERATION_CONFIG_FILE)
    if need_tokenizer:
        assert assets.tokenizer_dir is not None
        for src in assets.tokenizer_files:  # relative to their folder: additional_chat_templates/ keeps its own
            dst = folder / src.relative_to(assets.tokenizer_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            copy_regular(src, dst)
    return folder


__all__ = ["prepare_remote", "private_config_folder", "private_folder"]
