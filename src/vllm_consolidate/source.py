"""What every reader produces: a model described by metadata, with each tensor's bytes located on disk.

A reader never loads tensor data. It returns a :class:`SourceModel` whose :class:`TensorSpec` entries
name, shape and dtype each tensor and list the :class:`Segment` byte ranges that, concatenated, hold
its row-major bytes. The planner and writer work from this alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from vllm_consolidate.dtypes import DType


class Word(str, Enum):
    """A ``str`` enum that formats as its value everywhere (``enum.StrEnum`` is Python 3.11+).

    A member is written to JSON, compared with, and printed exactly as the plain word (``InputKind.DCP == "dcp"``).
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        # Enum's own __format__ gives "InputKind.DCP" in some Python versions; messages and tables need the word.
        return format(str(self.value), spec)


@dataclass(frozen=True)
class Segment:
    """A byte range of a file."""

    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Delta:
    """A low-rank update added to a tensor as it is written: ``(b @ a) * scale``, transposed when
    ``transpose`` (embeddings, Conv1D layers), computed in float32 (see :mod:`vllm_consolidate.plan.lora`)."""

    a: TensorSpec
    b: TensorSpec
    scale: float
    transpose: bool


@dataclass
class TensorSpec:
    """One tensor of the source model.

    Attributes:
        name: The state-dict key, after any renaming.
        dtype: The dtype of the bytes on disk.
        shape: The tensor's shape.
        segments: Byte ranges whose concatenation is the tensor's contiguous data.
        delta: A LoRA update to add to these bytes (a merge), else None.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    segments: list[Segment]
    delta: Delta | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def slice(self, first: int, shape: tuple[int, ...], name: str) -> TensorSpec:
        """The contiguous run of elements starting at ``first`` of the flat tensor, as its own tensor."""
        size = self.dtype.itemsize
        segments = list(sub_segments(self.segments, first * size, math.prod(shape) * size))
        return TensorSpec(name, self.dtype, shape, segments)


def sub_segments(segments: list[Segment], start: int, nbytes: int) -> Iterator[Segment]:
    """The byte ranges holding bytes ``[start, start + nbytes)`` of the concatenation of ``segments``."""
    pos = 0
    end = start + nbytes
    for seg in segments:
        a, b = max(start, pos), min(end, pos + seg.nbytes)
        if a < b:  # a whole range is yielded as it is, not copied (a TP weight is tens of thousands of them)
            yield seg if b - a == seg.nbytes else Segment(seg.path, seg.offset + (a - pos), b - a)
        pos += seg.nbytes
        if pos >= end:
            break


class LoraOutcome(Word):
    """What the LoRA plan made of a source; the word is also the report's ``type``."""

    MERGED = "lora_merge"  # the adapter merged into its base model: a full model
    ADAPTER = "lora_adapter"  # the adapter itself, exported for vLLM's LoRA support


@dataclass(frozen=True)
class LoraResult:
    """A LoRA fine-tune the plan merged or exported (:mod:`vllm_consolidate.plan.lora`).

    Attributes:
        outcome: Merged into the base, or the adapter itself.
        base_model: The base model's folder, when it was found (a merge always has one).
        adapter_config: The adapter's ``adapter_config.json`` (an export copies it).
    """

    outcome: LoraOutcome
    base_model: Path | None = None
    adapter_config: Path | None = None

    @property
    def is_adapter(self) -> bool:
        """Whether the output is the adapter (its own files) rather than a full model."""
        return self.outcome is LoraOutcome.ADAPTER


@dataclass
class SourceModel:
    """A model found on disk, described by metadata only.

    Attributes:
        kind: The reader's word (``read.registry.Format.kinds``: ``"deepspeed"``, ``"dcp"``, ``"verl"``,
            ``"peft"``, ``"hf_single"``, ``"hf_sharded"``), or what the LoRA plan made of it
            (:class:`LoraOutcome`). Callers ask the format's record (``read.registry.format_of_source``), not the word.
        path: The folder the weights were found in (``global_stepN`` for DeepSpeed).
        tensors: Tensors in the order they should be written.
        asset_dirs: Folders to search, in order, for config, tokenizer and generation config.
        trained_dtype: The precision the model was trained or stored in, if known.
        info: What was detected (stage, world size, tag, ...), for the summary.
        aliases: ``{alias: target}`` names that share one tensor (tied or shared weights).
        renamed: ``{old: new}`` wrapper prefixes stripped from names.
        lora: What the LoRA plan made of the source (None when it holds no LoRA fine-tune): callers branch
            on this typed field, never on ``kind``.
        config: A config.json the reader built from the checkpoint's own record (Megatron-LM's args), for a
            checkpoint with none beside it: written instead of one found elsewhere (a base model's).
    """

    kind: str
    path: Path
    tensors: list[TensorSpec]
    asset_dirs: list[Path] = field(default_factory=list)
    trained_dtype: DType | None = None
    info: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    lora: LoraResult | None = None
    config: dict[str, Any] | None = None

    @property
    def source_files(self) -> list[str]:
        """Every file a tensor is read from, in first-use order."""
        seen: dict[str, None] = {}
        for spec in self.tensors:
            for seg in spec.segments:
                seen.setdefault(seg.path, None)
        return list(seen)
