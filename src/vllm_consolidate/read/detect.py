"""Readers, one per input format, and the detection that picks one.

Each reader turns a folder into a :class:`~vllm_consolidate.source.SourceModel` from metadata only.

Confinement: the folder the user names (``--checkpoint-dir``, else ``--input``) is the root. It may
itself be a symlink. Every folder detection picks inside it (``checkpoint-N``, ``global_stepN``,
the tag in ``latest``) and every weight file a reader opens must, symlinks resolved, stay inside it
(for an HF-cache snapshot, inside its ``models--*`` folder); anything else is an
:class:`~vllm_consolidate.errors.UnsafeInputError` naming the link.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_consolidate.errors import ConsolidateError, CorruptCheckpointError, InputNotFoundError, UsageError
from vllm_consolidate.read.registry import FORMATS, INPUT_TYPES, TRAINING_KINDS, InputKind, format_of, is_not_mine
from vllm_consolidate.source import SourceModel

#: Re-exported: the CLI, convert and inspect import them from here.
__all__ = ["INPUT_TYPES", "TRAINING_KINDS", "DetectedInput", "InputKind", "detect", "read"]


@dataclass
class DetectedInput:
    """What an input folder holds and which folder the weights are read from.

    Attributes:
        kind: The format that claimed it (:class:`~vllm_consolidate.read.registry.InputKind`).
        input: The folder the user named.
        weights_dir: ``global_stepN`` for DeepSpeed, the model folder for HF.
        how: One line saying how it was chosen (printed in the summary).
        root: The folder the user named, which no file read may leave (default: ``weights_dir``).
    """

    kind: InputKind
    input: Path
    weights_dir: Path
    how: str
    root: Path | None = None


def detect(input_path: Path, input_type: str = "auto", checkpoint_dir: Path | None = None) -> DetectedInput:
    """Decide what ``input_path`` (or ``checkpoint_dir``, which overrides detection) holds.

    With ``auto``, the formats of :data:`~vllm_consolidate.read.registry.FORMATS` claim the folder in
    their order: ZeRO, DCP (FSDP), verl, peft, HF weights. A claim that fails with "not mine"
    (:class:`InputNotFoundError`) passes to the next format; any other error is "mine, but broken" and
    stops detection. A training checkpoint wins over HF weights in the same folder: HF Trainer under
    ZeRO-3 writes 16-bit (or empty placeholder) weights next to the fp32 masters, and the masters are the truth.

    Raises:
        InputNotFoundError: Nothing convertible is there.
        UnsafeInputError: A folder picked inside the input is a symlink out of it.
        CorruptCheckpointError: ``latest`` is unreadable or names no checkpoint.
    """
    if input_type not in INPUT_TYPES:
        raise UsageError(f"unknown --type {input_type}", hint=f"Use one of {', '.join(INPUT_TYPES)}.")
    input_path = Path(input_path)
    target = Path(checkpoint_dir) if checkpoint_dir is not None else input_path
    if not target.exists():
        raise InputNotFoundError("input does not exist", path=target)
    if not target.is_dir():
        raise InputNotFoundError("input must be a folder", path=target,
                                 hint="Pass the folder that holds the weights file, not the file itself.")
    how_prefix = "--checkpoint-dir; " if checkpoint_dir is not None else ""
    for fmt in FORMATS:
        if input_type not in ("auto", fmt.type_name):
            continue
        try:
            resolved = fmt.resolve(target)
        except ConsolidateError as exc:
            if is_not_mine(exc):
                if input_type == fmt.type_name and not fmt.last_resort:
                    raise
                continue
            rescued = fmt.rescue(target, exc) if fmt.rescue and input_type == "auto" and isinstance(
                exc, CorruptCheckpointError) else None
            if rescued is None:
                raise
            kind, resolved = rescued
            return DetectedInput(kind, input_path, resolved.folder, how_prefix + resolved.how, target)
        return DetectedInput(fmt.kind, input_path, resolved.folder, how_prefix + resolved.how, target)
    raise InputNotFoundError(
        "no checkpoint found: no ZeRO rank files, 'latest', global_stepN/, checkpoint-N/, DCP .metadata, "
        "verl global_step_N/actor/, *.safetensors or pytorch_model*.bin",
        path=target,
    )


def read(detected: DetectedInput, model_key: str | None = None, base_model_name: str | None = None) -> SourceModel:
    """Read the detected input's metadata with the reader of the format that claimed it.

    Args:
        detected: What :func:`detect` found.
        model_key: For DCP inputs, the container holding the model when there is more than one.
        base_model_name: ``--base-model-name``, for a format whose names need the model's config.json
            when the checkpoint has none (Megatron-Core's head layout and vocabulary size).
    """
    return format_of(detected.kind).read(detected.weights_dir, detected.root, model_key, base_model_name)
