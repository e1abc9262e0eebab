"""The context every check receives: the folder, what it stores, its config, the options, caches.

The checks run in the order of :data:`vllm_consolidate.validate.CHECKS`, and the early ones leave
what they learnt here for the later ones: the file checks fill :attr:`Context.stored`, the config
check :attr:`Context.config`, the skeleton step :attr:`Context.skeleton`. A check reads only what an
earlier check wrote, so the order of the table is the only coupling between them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vllm_consolidate.read.hf import StoredTensor
from vllm_consolidate.source import TensorSpec

if TYPE_CHECKING:
    from vllm_consolidate.validate.report import Check

#: Bytes read per step by the NaN/Inf scan; memory used by the scan is bounded by a small multiple.
SCAN_CHUNK_BYTES = 16 * 2**20


def transformers_module() -> ModuleType | None:
    """transformers, or None when it is not installed (it is an optional dependency)."""
    if importlib.util.find_spec("transformers") is None:
        return None
    try:
        import transformers
    except ImportError:
        return None
    return transformers


@contextlib.contextmanager
def quiet(tf: ModuleType) -> Iterator[None]:
    """Silence transformers' logging and Python warnings while it reads the folder (the library never prints)."""
    logging = tf.utils.logging
    old = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(old)


Shapes = dict[str, tuple[int, ...]]


@dataclass
class Skeleton:
    """Names and shapes expected from the config, as save_pretrained would write them.

    Attributes:
        class_name: The model class, for messages.
        required: What save_pretrained writes.
        allowed: ``required`` plus tied parameters, which may be stored too.
        tied: Tied parameter -> the parameter it shares.
        ignorable: The class's ``_keys_to_ignore_on_load_unexpected`` patterns.
        embedding: The input embedding's weight name, if the model has one.
        memory_required: transformers 5's in-memory names (fused MoE experts), when they differ from
            what save_pretrained writes; else None.
        memory_allowed: ``memory_required`` plus tied parameters; else None.
    """

    class_name: str
    required: Shapes
    allowed: Shapes
    tied: dict[str, str]
    ignorable: list[str]
    embedding: str | None
    memory_required: Shapes | None = None
    memory_allowed: Shapes | None = None


@dataclass
class Reference:
    """What a folder should hold: each output name with the source tensor it was made from.

    Attributes:
        label: The source, for messages (a path).
        tensors: ``{output name: source tensor}``.
        dropped: Names a conversion leaves out on purpose (a tied ``lm_head.weight``).
        depth: ``"full"`` or ``"sample"`` (see the module docstring).
    """

    label: str
    tensors: dict[str, TensorSpec]
    dropped: list[str]
    depth: str = "full"


@dataclass
class Stored:
    """What the weight files hold, as the file checks found it.

    Attributes:
        family: ``"safetensors"``, ``"bin"``, or None when there are no weight files.
        files: The weight files read (one family only).
        index_path: The family's ``*.index.json``, if present.
        by_file: Each readable file's tensors, by file name.
        tensors: Every tensor by name (the first file wins a name stored twice).
        bin_errors: Why a weight file could not be read, by file name.
    """

    family: str | None = None
    files: list[Path] = field(default_factory=list)
    index_path: Path | None = None
    by_file: dict[str, list[StoredTensor]] = field(default_factory=dict)
    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    bin_errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """One validation run: the options, and what the checks found so far.

    Attributes:
        folder: The model folder.
        scan_values: Whether the NaN/Inf scan reads the tensor bytes.
        chunk_bytes: Read size of the value scan and of the tied-embedding comparison.
        reference: The source to compare with, if any.
        stored: Filled by the file checks.
        config: config.json, once the config check has parsed it to a dict.
        skeleton: The names and shapes the config implies, once built.
        skeleton_error: Why no skeleton could be built (reported by ``missing_tensors``).
    """

    folder: Path
    scan_values: bool = True
    chunk_bytes: int = SCAN_CHUNK_BYTES
    reference: Reference | None = None
    stored: Stored = field(default_factory=Stored)
    config: dict[str, Any] | None = None
    skeleton: Skeleton | None = None
    skeleton_error: Check | None = None
    quant: Any = None  # a quantized folder's layout (validate.quantized.Layout), once its config is recognised

    def __post_init__(self) -> None:
        # A multiple of 16 is a multiple of every element size, so no chunk splits an element.
        self.chunk_bytes = max(64, self.chunk_bytes - self.chunk_bytes % 16)

    @cached_property
    def tf(self) -> ModuleType | None:
        """transformers, imported on first use (seconds), or None when it is not installed."""
        return transformers_module()

    def config_value(self, key: str) -> Any:
        """``key`` of config.json, or of its ``text_config`` (multimodal configs nest the language model's).

        Only call it once :attr:`config` is set.
        """
        assert self.config is not None
        if key in self.config:
            return self.config[key]
        return (self.config.get("text_config") or {}).get(key)


__all__ = ["SCAN_CHUNK_BYTES", "Context", "Stored", "quiet", "transformers_module"]
