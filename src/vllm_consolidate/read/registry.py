"""The input formats, in the one order detection tries them: the registry.

A format is one :class:`Format` record: its :class:`InputKind`, the ``--type`` word that selects it, how
it *claims* a path (``resolve``) and how it reads the folder it claimed (``read``). :data:`FORMATS` lists
them in priority order; :func:`~vllm_consolidate.read.detect.detect` is a loop over it, and ``--type``,
the training kinds and the "no checkpoint found" message are derived from it.

The claim contract (as torch DCP's ``StorageReader.validate_checkpoint_id``, with the reason kept):

* :class:`~vllm_consolidate.errors.InputNotFoundError` means **not mine**: the loop goes on to the next
  format (with ``--type`` naming this format, it is the error);
* any other :class:`~vllm_consolidate.errors.ConsolidateError` means **mine, but broken**: detection
  stops there, so a damaged checkpoint is reported as damaged instead of as something else.

So a format must only raise "broken" for a layout that is unmistakably its own: the verl tracker
``latest_checkpointed_iteration.txt`` counts as verl's only beside ``global_step_N`` folders (Megatron-Core
writes a file of the same name beside ``iter_NNNNNNN``), and a DCP folder with Megatron-Core's
``metadata.json`` is not claimed as plain DCP.

The registry names each format's module by string (``_Module("deepspeed")``) and imports it only when
detection calls one of its functions: listing the formats imports none of them, and a conversion loads
the claims detection asks before one says "mine" and the reader of that one, no other.

Adding a format: write ``read/<format>.py`` (its claim raising ``InputNotFoundError`` when not its own,
and its reader), add its word to :class:`InputKind` and one :class:`Format` line to :data:`FORMATS` at
the place its priority says (naming its functions through a ``_Module`` of it), then its corpus case and
tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from vllm_consolidate.errors import ConsolidateError, CorruptCheckpointError, InputNotFoundError
from vllm_consolidate.source import SourceModel, Word

if TYPE_CHECKING:
    from vllm_consolidate.read.steps import SaveList
    from vllm_consolidate.read.zero_locate import ResolvedCheckpoint


class _Function(NamedTuple):
    """A function of a format's module, imported when first called (see :class:`_Module`)."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args)


class _Module:
    """A format's module, named by string: ``zl.resolve_checkpoint`` is that function, imported on its first call.

    The registry lists every format without importing one, so detection loads only the claims it asks and
    the reader it picks: a ZeRO conversion never imports the Megatron, DCP, verl, peft or HF readers (each
    with its own formats and checks), and ``--help`` (which lists ``--type``) imports none.
    """

    def __init__(self, name: str) -> None:
        self.module = f"vllm_consolidate.read.{name}"

    def __getattr__(self, name: str) -> _Function:
        if name.startswith("__"):  # copy, pickle and introspection ask for dunders: this is no module
            raise AttributeError(name)
        return _Function(self.module, name)


# The claims (``*_locate``) and the readers are separate modules: asking a format "is this yours?" loads no reader.
zl, ds = _Module("zero_locate"), _Module("deepspeed")
mg = _Module("megatron")
fl, dcp, verl = _Module("fsdp_locate"), _Module("dcp"), _Module("verl")
peft = _Module("peft")
hfl, hf = _Module("hf_layout"), _Module("hf")
#: ``SourceModel.kind`` of an HF model in one weights file, and of one sharded with an index (``read.hf`` gives them).
HF_SINGLE, HF_SHARDED = "hf_single", "hf_sharded"


class LoraLayout(Word):
    """Where a format keeps a LoRA fine-tune, when it holds one."""

    FACTORS = "factors"  # LoRA factors among the trained tensors; the base model is found elsewhere
    ADAPTER = "adapter"  # the folder is the adapter itself (peft)
    RANK_FILES = "rank_files"  # base model and factors together in the rank files (verl)


class InputKind(Word):
    """What an input is: the one vocabulary of detection, ``--type``, ``--json``, manifests and ``inspect``.

    The values are the words the JSON reports have always carried (``DetectedInput.kind``).
    """

    DEEPSPEED = "deepspeed"
    MEGATRON = "megatron"
    DCP = "dcp"
    VERL = "verl"
    PEFT = "peft"
    HF = "hf"


#: ``read(weights_dir, root, model_key, base_model_name)``: the claimed folder's metadata as a :class:`SourceModel`
#: (``base_model_name``, ``--base-model-name``, for a format whose names need the model's config: Megatron-Core).
Reader = Callable[[Path, Path | None, str | None, str | None], SourceModel]
#: ``rescue(path, error)``: a later format's claim on a folder this one found broken, or None.
Rescue = Callable[[Path, CorruptCheckpointError], "tuple[InputKind, ResolvedCheckpoint] | None"]


class Holds(NamedTuple):
    """A column of ``inspect``'s table of saves: its JSON word, its label, and the test on a folder.

    ``nested``: the save keeps its weights in a sub-folder of the checkpoint folder (``pytorch_model_fsdp_0/``,
    ``actor/``), so the checkpoint folder counts as picked when detection chose that sub-folder.
    """

    word: str
    label: str
    test: Callable[[Path], bool]
    nested: bool = False


@dataclass(frozen=True)
class Format:
    """One input format (see the module docstring).

    Attributes:
        kind: Its word.
        type_name: The ``--type`` value that selects it (``hf_sharded`` for HF: kept for old command lines).
        training: Its weights are the trainer's own state (fp32 masters or sharded training state), not a
            saved model: the dtype choice and ``--keep-original-precision`` treat them as such.
        resolve: Claims a path: the folder its weights are read from, or InputNotFoundError (not mine).
        read: Reads the folder ``resolve`` chose.
        rescue: With ``--type auto``, what to do when ``resolve`` finds the folder broken but another
            format's files are there too (a LoRA save copied without its ``global_stepN/`` keeps ``latest``).
        last_resort: Its "not mine", even with ``--type`` naming it, gives detection's own "no checkpoint
            found" message, which lists what every format looks for (HF: any folder may be meant as one).
        source_kinds: The ``SourceModel.kind`` words its reader gives, when not just its own word.
        precision_from: Where ``SourceModel.trained_dtype`` comes from (``inspect`` reports it).
        rank_files: The ranks of its files present, by name only (``inspect`` reports them, even when the
            read fails).
        asset_dirs: Folders holding config and tokenizer for a claimed folder, searched even when its
            reader refuses it (``inspect`` still reports the assets).
        lora: Where it keeps a LoRA fine-tune.
        lora_what: The adapter's weights, as messages name them.
        saves: A run folder's saves of this format, by step, and the one ``convert`` picks (``batch`` lists
            them; None when the folder holds none).
        holds: How ``inspect``'s table of saves says a folder holds this format.
    """

    kind: InputKind
    type_name: str
    training: bool
    resolve: Callable[[Path], ResolvedCheckpoint]
    read: Reader
    rescue: Rescue | None = None
    last_resort: bool = False
    source_kinds: tuple[str, ...] = ()
    precision_from: str = "stored_dtype"
    rank_files: Callable[[Path], dict[str, list[int]] | None] | None = None
    asset_dirs: Callable[[Path], list[Path]] = lambda folder: []
    lora: LoraLayout = LoraLayout.FACTORS
    lora_what: Callable[[SourceModel, Path], str] = lambda source, weights_dir: str(source.path)
    saves: Callable[[Path], SaveList | None] | None = None
    holds: Holds | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        """The ``SourceModel.kind`` words its reader gives (its own word unless it has several layouts)."""
        return self.source_kinds or (str(self.kind),)


def _peft_rescue(path: Path, exc: CorruptCheckpointError) -> tuple[InputKind, ResolvedCheckpoint] | None:
    """A broken ZeRO save whose folder is also a peft adapter: the adapter file is used."""
    from vllm_consolidate.read.zero_locate import ResolvedCheckpoint

    if not peft.is_peft_folder(path):
        return None
    return InputKind.PEFT, ResolvedCheckpoint(path, path.name,
                                              f"peft adapter folder ({exc.message}: the adapter file is used)")


def _resolve_hf(path: Path) -> ResolvedCheckpoint:
    """HF weights in the folder, else in its latest ``checkpoint-N``."""
    from vllm_consolidate.read.zero_locate import ResolvedCheckpoint

    if hfl.is_hf_folder(path):
        return ResolvedCheckpoint(path, path.name, "HF weights in the folder given")
    ckpt = zl.latest_checkpoint_folder(path)
    if ckpt is not None and hfl.is_hf_folder(ckpt):
        return ResolvedCheckpoint(ckpt, ckpt.name, f"HF weights in the latest {ckpt.name}")
    raise InputNotFoundError("no HF weights (*.safetensors or pytorch_model*.bin)", path=path)


#: The formats in priority order. A training save wins over HF weights in the same folder (HF Trainer under
#: ZeRO-3 writes 16-bit or empty placeholder weights next to the fp32 masters, and the masters are the
#: truth); an adapter wins over HF weights (a peft folder may hold a base model's files too).
FORMATS: tuple[Format, ...] = (
    # ZeRO first: its rank files are unmistakable, and HF Trainer runs hold them beside everything else.
    Format(InputKind.DEEPSPEED, "deepspeed", True, zl.resolve_checkpoint,
           lambda d, root, key, base: ds.read_deepspeed(d, root), rescue=_peft_rescue,
           precision_from="deepspeed_config",
           rank_files=ds.rank_files, lora_what=lambda source, d: f"fp32 masters in {d.name}", saves=zl.zero_saves,
           holds=Holds("zero", "ZeRO rank files", zl.is_zero_checkpoint_folder)),
    # Megatron-Core before DCP: its iter_N folders are DCP folders too (with its metadata.json).
    Format(InputKind.MEGATRON, "megatron", True, mg.resolve_megatron, mg.read_megatron, asset_dirs=mg.asset_dirs,
           saves=mg.megatron_save_list, holds=Holds("megatron", "Megatron-Core torch_dist", mg.is_megatron_folder)),
    Format(InputKind.DCP, "dcp", True, fl.resolve_dcp, lambda d, root, key, base: dcp.read_dcp(d, root, key),
           saves=fl.dcp_save_list,
           holds=Holds("dcp", "DCP (FSDP) weights", fl.is_dcp_save, nested=True)),
    Format(InputKind.VERL, "verl", True, fl.resolve_verl, lambda d, root, key, base: verl.read_verl(d, root),
           asset_dirs=verl.asset_dirs, lora=LoraLayout.RANK_FILES, saves=fl.verl_save_list,
           holds=Holds("verl", "verl actor/critic", fl.is_verl_step, nested=True)),
    Format(InputKind.PEFT, "peft", False, peft.resolve_peft, lambda d, root, key, base: peft.read_peft_folder(d, root),
           lora=LoraLayout.ADAPTER,
           lora_what=lambda source, d: f"{source.info.get('adapter_file')} ({source.info.get('adapter_dtype')})"),
    # HF last: any folder with a weights file is one, so every more specific format goes first.
    Format(InputKind.HF, "hf_sharded", False, _resolve_hf, lambda d, root, key, base: hf.read_hf(d, root),
           last_resort=True, source_kinds=(HF_SINGLE, HF_SHARDED),
           holds=Holds("hf", "HF weights", hfl.is_hf_folder)),
)
BY_KIND: dict[InputKind, Format] = {f.kind: f for f in FORMATS}
_BY_SOURCE_KIND: dict[str, Format] = {k: f for f in FORMATS for k in f.kinds}
#: ``--type`` values. ``dcp`` covers HF Trainer / Accelerate FSDP and any torch.distributed.checkpoint.
INPUT_TYPES: tuple[str, ...] = ("auto", *(f.type_name for f in FORMATS))
#: Formats whose weights are the trainer's own (fp32 masters or sharded training state), not a saved model.
TRAINING_KINDS: tuple[InputKind, ...] = tuple(f.kind for f in FORMATS if f.training)


#: ``inspect``'s columns, in this order.
HOLDS: tuple[Holds, ...] = tuple(f.holds for f in FORMATS if f.holds is not None)


def run_saves(path: Path) -> tuple[Format, SaveList] | None:
    """The first format, in priority order, that finds saves in the run folder ``path``, and its saves."""
    return next(((f, found) for f in FORMATS if f.saves is not None and (found := f.saves(path)) is not None), None)


def format_of(kind: str) -> Format:
    """The format of a kind word (``"deepspeed"``...)."""
    return BY_KIND[InputKind(kind)]


def format_of_source(source: SourceModel) -> Format | None:
    """The format whose reader gave ``source``; None for a planned model (a merged LoRA, an adapter export)."""
    return _BY_SOURCE_KIND.get(str(source.kind))


def is_training_source(source: SourceModel) -> bool:
    """Whether ``source`` holds a trainer's own weights (see :attr:`Format.training`)."""
    fmt = format_of_source(source)
    return fmt is not None and fmt.training


def is_single_file_model(source: SourceModel) -> bool:
    """Whether ``source`` is an HF model in one weights file (which may already be what convert would write)."""
    return str(source.kind) == HF_SINGLE


def is_not_mine(exc: ConsolidateError) -> bool:
    """Whether a claim's error means "not this format" (the next one is tried) rather than "broken"."""
    return isinstance(exc, InputNotFoundError)


__all__ = ["BY_KIND", "FORMATS", "HF_SHARDED", "HF_SINGLE", "HOLDS", "INPUT_TYPES", "TRAINING_KINDS", "Format", "Holds",
           "InputKind", "LoraLayout", "format_of", "format_of_source", "run_saves", "is_not_mine",
           "is_single_file_model", "is_training_source"]
