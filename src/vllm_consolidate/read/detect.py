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

from vllm_consolidate.errors import CorruptCheckpointError, InputNotFoundError, UsageError
from vllm_consolidate.read import deepspeed as ds
from vllm_consolidate.read import hf
from vllm_consolidate.read.dcp import read_dcp
from vllm_consolidate.read.fsdp_locate import resolve_dcp, resolve_verl
from vllm_consolidate.read.peft import is_peft_folder, read_peft_folder, resolve_peft
from vllm_consolidate.read.verl import read_verl
from vllm_consolidate.source import SourceModel

#: ``--type`` values. ``dcp`` covers HF Trainer / Accelerate FSDP and any torch.distributed.checkpoint.
INPUT_TYPES = ("auto", "deepspeed", "dcp", "verl", "peft", "hf_sharded")
#: Formats whose weights are the trainer's own (fp32 masters or sharded training state), not a saved model.
TRAINING_KINDS = ("deepspeed", "dcp", "verl")


@dataclass
class DetectedInput:
    """What an input folder holds and which folder the weights are read from.

    Attributes:
        kind: ``"deepspeed"``, ``"dcp"``, ``"verl"``, ``"peft"`` or ``"hf"``.
        input: The folder the user named.
        weights_dir: ``global_stepN`` for DeepSpeed, the model folder for HF.
        how: One line saying how it was chosen (printed in the summary).
        root: The folder the user named, which no file read may leave (default: ``weights_dir``).
    """

    kind: str
    input: Path
    weights_dir: Path
    how: str
    root: Path | None = None


def _hf_folder(path: Path) -> Path | None:
    if hf.is_hf_folder(path):
        return path
    ckpt = ds.latest_checkpoint_folder(path) if path.is_dir() else None
    if ckpt is not None and hf.is_hf_folder(ckpt):
        return ckpt
    return None


def detect(input_path: Path, input_type: str = "auto", checkpoint_dir: Path | None = None) -> DetectedInput:
    """Decide what ``input_path`` (or ``checkpoint_dir``, which overrides detection) holds.

    With ``auto``, formats are tried in the order ZeRO, DCP (FSDP), verl, HF weights. A training
    checkpoint wins over HF weights in the same folder: HF Trainer under ZeRO-3 writes 16-bit (or
    empty placeholder) weights next to the fp32 masters, and the masters are the truth.

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
    for kind, resolve in (("deepspeed", ds.resolve_checkpoint), ("dcp", resolve_dcp), ("verl", resolve_verl),
                          ("peft", resolve_peft)):
        if input_type not in ("auto", kind):
            continue
        try:
            resolved = resolve(target)
            return DetectedInput(kind, input_path, resolved.folder, how_prefix + resolved.how, target)
        except InputNotFoundError:
            if input_type == kind:
                raise
        except CorruptCheckpointError as exc:
            # A LoRA checkpoint copied without its global_stepN/ keeps 'latest': its adapter file is still there.
            if kind != "deepspeed" or input_type != "auto" or not is_peft_folder(target):
                raise
            return DetectedInput("peft", input_path, target,
                                 f"{how_prefix}peft adapter folder ({exc.message}: the adapter file is used)", target)
    folder = _hf_folder(target)
    if folder is not None:
        how = "HF weights in the folder given" if folder == target else f"HF weights in the latest {folder.name}"
        return DetectedInput("hf", input_path, folder, how_prefix + how, target)
    raise InputNotFoundError(
        "no checkpoint found: no ZeRO rank files, 'latest', global_stepN/, checkpoint-N/, DCP .metadata, "
        "verl global_step_N/actor/, *.safetensors or pytorch_model*.bin",
        path=target,
    )


def read(detected: DetectedInput, model_key: str | None = None) -> SourceModel:
    """Read the detected input's metadata with the matching reader.

    Args:
        detected: What :func:`detect` found.
        model_key: For DCP inputs, the container holding the model when there is more than one.
    """
    if detected.kind == "deepspeed":
        return ds.read_deepspeed(detected.weights_dir, detected.root)
    if detected.kind == "dcp":
        return read_dcp(detected.weights_dir, detected.root, model_key)
    if detected.kind == "verl":
        return read_verl(detected.weights_dir, detected.root)
    if detected.kind == "peft":
        return read_peft_folder(detected.weights_dir, detected.root)
    return hf.read_hf(detected.weights_dir, detected.root)
