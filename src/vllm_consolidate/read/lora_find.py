"""Finding a LoRA fine-tune in a source, and the base model it was trained on.

A format says where it keeps a LoRA fine-tune (:class:`~vllm_consolidate.read.registry.LoraLayout`): LoRA
factors among the trained tensors (ZeRO, DCP, HF), the adapter folder itself (peft), or base model and
factors together in the rank files (verl). :func:`find_lora` reads the adapter from there;
:func:`find_base` finds the base model, never following a path the checkpoint names.
:mod:`vllm_consolidate.plan.lora` plans the merge or the export from what these return.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_consolidate.errors import ConfigNotFoundError, InputNotFoundError, UnsupportedCheckpointError
from vllm_consolidate.read.assets import resolve_base_model, search_chain
from vllm_consolidate.read.registry import BY_KIND, InputKind, LoraLayout, format_of_source
from vllm_consolidate.source import SourceModel, TensorSpec

if TYPE_CHECKING:
    from vllm_consolidate.read import peft

_LORA_NAME = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B)(?:\.|$)")


def is_lora_name(name: str) -> bool:
    """True for a LoRA factor's name, in either naming scheme."""
    return _LORA_NAME.search(name) is not None


def holds_lora(kind: str, source: SourceModel) -> bool:
    """Whether an input of format ``kind`` read as ``source`` is a LoRA fine-tune: an adapter folder, or LoRA
    factors among its tensors (it needs a merge: streaming it as it is would serve the base model).

    Asked before the LoRA planner is imported: a full model loads none of the adapter readers (peft, verl).
    """
    return BY_KIND[InputKind(kind)].lora == LoraLayout.ADAPTER or any(is_lora_name(t.name) for t in source.tensors)


def find_lora(source: SourceModel, weights_dir: Path, input_dir: Path) -> peft.Adapter | None:
    """The LoRA adapter a source holds, else None (a full model).

    LoRA is recognised by an ``adapter_config.json`` in the checkpoint folder or its parents, together
    with LoRA factors among the tensors (a DeepSpeed checkpoint's fp32 masters, or a peft folder's
    adapter file).

    Raises:
        UnsupportedCheckpointError: LoRA factors without an ``adapter_config.json``, or a peft feature
            that cannot be merged.
    """
    fmt = format_of_source(source)
    layout = fmt.lora if fmt is not None else LoraLayout.FACTORS
    if layout != LoraLayout.ADAPTER and not any(is_lora_name(t.name) for t in source.tensors):
        return None
    from vllm_consolidate.read import peft  # a LoRA fine-tune: only now are the adapter's readers needed
    if layout == LoraLayout.RANK_FILES:
        return verl_lora(source, weights_dir)[1]
    config_path = peft.find_adapter_config(search_chain(weights_dir, input_dir))
    if config_path is None:
        raise UnsupportedCheckpointError(
            "the checkpoint holds LoRA factors but no adapter_config.json was found next to it or above it",
            path=weights_dir, hint="Copy the run's adapter_config.json into the checkpoint-N folder.")
    config = peft.read_lora_config(config_path)
    what = fmt.lora_what(source, weights_dir) if fmt is not None else str(source.path)
    return peft.read_adapter(config, source.tensors, what, source.path)


def verl_lora(source: SourceModel, weights_dir: Path) -> tuple[SourceModel, peft.Adapter]:
    """A verl LoRA run's base model and adapter, both inside its rank files.

    The settings come from ``lora_adapter/adapter_config.json`` when verl wrote one, else from
    ``lora_train_meta.json`` (``r`` and ``lora_alpha`` only).

    Raises:
        UnsupportedCheckpointError: Neither file is there.
    """
    from vllm_consolidate.read import peft, verl

    full = weights_dir / verl.LORA_FOLDER / peft.ADAPTER_CONFIG
    if os.path.lexists(full):  # read (and refused by name) whatever it is
        config = peft.read_lora_config(full)
    elif (weights_dir / verl.LORA_META).is_file():
        config = peft.read_verl_lora_meta(weights_dir / verl.LORA_META)
    else:
        raise UnsupportedCheckpointError(
            f"this verl checkpoint holds LoRA factors but no {verl.LORA_META} or {verl.LORA_FOLDER}/ records their "
            "r and lora_alpha", path=weights_dir, hint="Merge it with verl's model_merger, then convert the result.")
    factors = [t for t in source.tensors if is_lora_name(t.name)]
    adapter = peft.read_adapter(config, factors, f"the rank files of {weights_dir.parent.name}/{weights_dir.name}",
                                source.path)

    def base_name(name: str) -> str:
        name = name[len(peft.PEFT_PREFIX):] if name.startswith(peft.PEFT_PREFIX) else name
        return name.replace(".base_layer.", ".")

    base = [TensorSpec(base_name(t.name), t.dtype, t.shape, t.segments) for t in source.tensors
            if not is_lora_name(t.name)]
    aliases = {base_name(a): base_name(b) for a, b in source.aliases.items()}
    return SourceModel(kind="verl", path=source.path, tensors=base, asset_dirs=source.asset_dirs,
                       trained_dtype=source.trained_dtype, info=source.info, aliases=aliases), adapter


def find_base(adapter: peft.Adapter, base_model_name: str | None, default_base: str | None) -> Path:
    """The base model's folder: ``base_model_name`` unless it is ``default_base`` (the option's default), a local
    folder or a Hub id in the HF cache; else the adapter config's ``base_model_name_or_path``, which must be a Hub id
    found in the HF cache.

    A path in ``adapter_config.json`` is never followed: the checkpoint would choose which local model is read and
    published (``/home/me/other-model``, ``../../secret-model``). The user names a local base with the option.

    Raises:
        ConfigNotFoundError: The adapter names its base by a local path, and the option does not name one.
        InputNotFoundError: Not found (not a local folder or not in the HF cache).
    """
    explicit = base_model_name if base_model_name != default_base else None
    hint = "Pass the base model's folder (or its Hub id, if it is in the HF cache) with --base-model-name."
    name = explicit or adapter.config.base_model or default_base
    if not explicit and adapter.config.base_model and not _is_hub_id(adapter.config.base_model):
        raise ConfigNotFoundError(
            f"the adapter names its base model by the local path {repr(adapter.config.base_model[:200])}, which is not "
            "followed (a checkpoint does not choose which local model is read): name it with --base-model-name",
            path=adapter.config.path, hint="Pass the folder of the model the adapter was trained on: "
            "--base-model-name FOLDER.")
    base_dir, error = resolve_base_model(name, download=bool(explicit), local_folders=bool(explicit))
    if base_dir is None:
        raise InputNotFoundError(f"the adapter's base model {name} was not found ({error})",
                                 path=adapter.config.path, hint=hint)
    return base_dir


def _is_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` as the Hub spells repo ids (no path: no ``/`` start, ``..``, ``~`` or backslash)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", "~", ".")) or "\\" in name or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def vllm_unsupported(adapter: peft.Adapter) -> list[str]:
    """What in an adapter vLLM's LoRA support refuses (observed with vLLM 0.32: it raises on each)."""
    found = []
    embeddings = sorted(m for m, lora in adapter.modules.items() if lora.embedding)
    if embeddings:
        found.append(f"LoRA on embeddings ({', '.join(embeddings)})")
    if any(m == "lm_head" or m.endswith(".lm_head") for m in adapter.modules):
        found.append("LoRA on lm_head")
    saved = [m for m in adapter.config.modules_to_save if m not in ("classifier", "score")]
    if saved:
        found.append(f"modules_to_save {saved}")
    if adapter.config.bias != "none":
        found.append(f"trained biases (bias={adapter.config.bias})")
    return found


__all__ = ["find_base", "find_lora", "holds_lora", "is_lora_name", "verl_lora", "vllm_unsupported"]
