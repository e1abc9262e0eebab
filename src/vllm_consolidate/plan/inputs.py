"""Which input, and the one way it becomes a :class:`~vllm_consolidate.source.SourceModel`.

``convert``, ``inspect``, ``validate --against`` and the vLLM load format all start the same way: an
:class:`InputSpec` (the folder, ``--type``, ``--checkpoint-dir``, ``--model-key`` and the LoRA base model)
is detected by the format registry (:func:`detect_input`), read by the format that claimed it, and, for a
LoRA fine-tune, merged into its base or exported as an adapter (:func:`read_input`). Each caller then does
its own part (plan and write, report, compare, stream), so "which input" is spelled once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from vllm_consolidate.errors import UsageError
from vllm_consolidate.read import detect as detection
from vllm_consolidate.read.assets import DEFAULT_BASE_MODEL
from vllm_consolidate.read.lora_find import holds_lora
from vllm_consolidate.source import SourceModel, Word


class LoraMode(Word):
    """What becomes of a LoRA fine-tune (``--lora``)."""

    MERGE = "merge"  # the adapter merged into its base model (a full model); a full model as it is
    ADAPTER = "adapter"  # the adapter itself, for vLLM's LoRA support
    AS_READ = "as_read"  # no LoRA step: what the format's reader gives (the vLLM load format refuses LoRA)


#: The ``--lora`` values a user may give.
LORA_MODES: tuple[str, ...] = (LoraMode.MERGE.value, LoraMode.ADAPTER.value)


@dataclass(frozen=True)
class InputSpec:
    """Which input to read (the options of ``convert`` that say so, shared by every command).

    Attributes:
        path: The input folder (a run, a checkpoint, a save, an HF model).
        type: ``--type``: ``auto`` or a format's word (``read.registry.INPUT_TYPES``).
        checkpoint_dir: ``--checkpoint-dir``: overrides detection.
        model_key: ``--model-key``: the container holding the model in a DCP save with several.
        base_model_name: ``--base-model-name``: a LoRA run's base model (a folder or a cached Hub id).
        default_base: The option's default value, which does not count as the user naming a base (the
            adapter's own Hub id wins over it); None when the command has no default.
    """

    path: Path
    type: str = "auto"
    checkpoint_dir: Path | None = None
    model_key: str | None = None
    base_model_name: str | None = None
    default_base: str | None = DEFAULT_BASE_MODEL


class OpenedInput(NamedTuple):
    """An input detected and read (metadata only)."""

    detected: detection.DetectedInput
    source: SourceModel


def detect_input(spec: InputSpec) -> detection.DetectedInput:
    """Which format claims the input and which folder its weights are read from (see ``read.detect``)."""
    return detection.detect(Path(spec.path), spec.type, spec.checkpoint_dir)


def read_input(spec: InputSpec, detected: detection.DetectedInput, lora: LoraMode = LoraMode.MERGE) -> SourceModel:
    """The detected input's model: read by its format, then the LoRA step ``lora`` asks for.

    Raises:
        UsageError: ``lora`` is not a mode.
        ConsolidateError: The reader's or the LoRA plan's errors.
    """
    if lora not in tuple(LoraMode):
        raise UsageError(f"unknown --lora {lora}", hint=f"Use one of {', '.join(LORA_MODES)}.")
    source = detection.read(detected, spec.model_key, spec.base_model_name)
    if lora == LoraMode.AS_READ or (lora == LoraMode.MERGE and not holds_lora(detected.kind, source)):
        return source  # a full model: nothing to merge (and the LoRA planner, peft and verl stay unloaded)
    from vllm_consolidate.plan.lora import adapter_export, merge_lora

    if lora == LoraMode.ADAPTER:
        return adapter_export(source, detected.weights_dir, Path(spec.path), spec.base_model_name)
    return merge_lora(source, detected.weights_dir, Path(spec.path), spec.base_model_name, spec.default_base)


def open_input(spec: InputSpec, lora: LoraMode = LoraMode.MERGE) -> OpenedInput:
    """:func:`detect_input` then :func:`read_input`."""
    detected = detect_input(spec)
    return OpenedInput(detected, read_input(spec, detected, lora))


__all__ = ["LORA_MODES", "InputSpec", "LoraMode", "OpenedInput", "detect_input", "open_input", "read_input"]
