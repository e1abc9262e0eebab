"""Reader for Megatron-Core ``torch_dist`` checkpoints: Megatron-LM, NeMo 2, Megatron-Bridge, verl's Megatron backend.

A ``torch_dist`` save is a DCP folder (``.metadata`` + ``__R_T.distcp``) with Megatron-Core's own
``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``) and the non-sharded state (Megatron-LM's
``args``, the iteration): ``common.pt`` up to megatron-core 0.18, the DCP object ``common_state`` from 0.19.
Every ``ShardedTensor`` of any TP/PP/VPP/EP layout is a chunk of one global tensor in the DCP metadata, so the
container reader does the work (:mod:`.dcp`, :mod:`.chunks`); :mod:`.megatron_names` maps the global tensors to
Hugging Face names as element ranges. Nothing but metadata and each chunk's archive header is read.

Inputs claimed (see :func:`resolve_megatron`): the save folder itself; a Megatron-LM run
(``latest_checkpointed_iteration.txt`` naming ``N`` or ``release``, beside ``iter_NNNNNNN/``; else the
highest ``iter_N`` that is a save); NeMo 2's ``weights/``; verl's Megatron backend (``dist_ckpt/``, an
``actor/dist_ckpt/`` in a ``global_step_N``, or a run of those: the tracker's step, else the highest). The
tracker is the same file name verl uses: as Megatron-LM's it counts only beside ``iter_*`` folders.

The head layout and the true vocabulary size (the embedding is padded) come from, in order, a
``config.json`` where the output's config is found (the save folder and its run, verl's ``huggingface/``,
NeMo's ``context/``), else the save's own record of its model: Megatron-LM's ``args`` in ``common.pt`` (or,
from megatron-core 0.19, in the ``common_state`` object inside a ``.distcp`` file),
Megatron-Bridge's ``run_config.yaml`` in the ``iter_N`` save (a Bridge run is otherwise a Megatron-LM run:
the same tracker and ``iter_N`` folders, plus ``train_state.pt`` and ``tokenizer/``), or NeMo 2's
``context/model.yaml`` (:mod:`~vllm_consolidate.formats.megatron_common`). When none gives them the reader
refuses (exit 8): a split is never guessed.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from vllm_consolidate.errors import (
    ConfigNotFoundError,
    ConsolidateError,
    CorruptCheckpointError,
    InputNotFoundError,
    UnsupportedCheckpointError,
    naming_file,
)
from vllm_consolidate.formats import dcp
from vllm_consolidate.formats.megatron_common import (
    COMMON_FILE,
    COMMON_STATE_KEY,
    NEMO_MODEL_YAML,
    RUN_CONFIG_FILE,
    read_args,
    read_common_state_args,
    read_nemo_model_yaml,
    read_run_config,
)
from vllm_consolidate.limits import brief
from vllm_consolidate.read.assets import find_checkpoint_assets, read_config
from vllm_consolidate.read.chunks import assemble
from vllm_consolidate.read.dcp import _piece, check_layout, check_storage_files, stored_dtype
from vllm_consolidate.read.fsdp_locate import MEGATRON_METADATA, VERL_TRACKER, is_megatron_save, verl_tracked_step
from vllm_consolidate.read.hf import check_weight_file
from vllm_consolidate.read.megatron_config import (
    HINT_BASE,
    args_from_run_config,
    check_base_agrees,
    config_from_args,
    layout_from_config,
)
from vllm_consolidate.read.megatron_names import Layout, Pick, model_name, picks
from vllm_consolidate.read.megatron_nemo import nemo_tokenizer_dir, nemo_tokenizer_vocab
from vllm_consolidate.read.steps import Checkpoint, SaveList
from vllm_consolidate.read.zero_locate import ResolvedCheckpoint, confine_chosen
from vllm_consolidate.safe_io import MAX_TAG_BYTES, read_json, read_text
from vllm_consolidate.source import Segment, SourceModel, TensorSpec

TRACKER = VERL_TRACKER  # Megatron-LM's name; verl copied it
_ITER = re.compile(r"^iter_(\d{7,})$")
_VERL_STEP = re.compile(r"^global_step_(\d+)$")
#: verl's Megatron backend keeps the actor's torch_dist save here, beside ``actor/huggingface/``.
VERL_ACTOR = Path("actor") / "dist_ckpt"
RELEASE = "release"
#: Sub-folders holding the save: NeMo 2's ``weights/``, verl's ``dist_ckpt/``.
SAVE_FOLDERS = ("weights", "dist_ckpt")
#: Folders beside the save holding an HF config and tokenizer: verl's ``huggingface/``, NeMo's ``context/`` (and
#: its ``nemo_tokenizer/``, where NeMo's HF tokenizer artifact is copied), Megatron-Bridge's ``tokenizer/`` (in
#: the ``iter_N`` save itself, written when ``save_tokenizer_assets``).
ASSET_FOLDERS = ("huggingface", "context", "context/nemo_tokenizer", "tokenizer")


def is_megatron_folder(path: Path) -> bool:
    """True if ``path`` is a Megatron-Core distributed save: its ``metadata.json`` and a DCP ``.metadata``."""
    return dcp.is_dcp_folder(path) and is_megatron_save(path)


def _subfolders(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []


def iterations(path: Path) -> list[tuple[int, Path]]:
    """The ``iter_NNNNNNN`` sub-folders of a run that are saves, by iteration."""
    return sorted((int(m.group(1)), p) for p in _subfolders(path)
                  if (m := _ITER.match(p.name)) and is_megatron_folder(p))


def _tracked(path: Path) -> Path | None:
    """The save the run's tracker names (``iter_{N:07d}`` or ``release``); None without a tracker.

    Raises:
        CorruptCheckpointError: The tracker is unreadable, holds no iteration, or names a missing save.
    """
    tracker = path / TRACKER
    if not os.path.lexists(tracker):
        return None
    text = read_text(tracker, MAX_TAG_BYTES, what=TRACKER).strip()
    if text == RELEASE:
        name = RELEASE
    elif text.isascii() and text.isdigit() and len(text) <= 18:
        name = f"iter_{int(text):07d}"
    else:
        raise CorruptCheckpointError(f"{TRACKER} holds {brief(text)}, not an iteration", path=tracker)
    if dcp.is_dcp_folder(path / name) and os.path.lexists(path / name / MEGATRON_METADATA):
        _check_backend(path / name)  # an unreadable or foreign metadata.json: that is the error, named
    if not is_megatron_folder(path / name):
        raise CorruptCheckpointError(f"{TRACKER} names {name}, but it is missing or not a torch_dist save",
                                     path=tracker, hint="Pass the iter_NNNNNNN folder you want with --checkpoint-dir.")
    return confine_chosen(path / name, path)


def _is_run(path: Path) -> bool:
    """A Megatron-LM run: any ``iter_*``/``release`` folder (saved or not), which makes the tracker beside it ours."""
    return any(_ITER.match(p.name) or p.name == RELEASE for p in _subfolders(path))


def _check_backend(folder: Path) -> None:
    found = read_json(folder / MEGATRON_METADATA, MAX_TAG_BYTES, what=MEGATRON_METADATA)
    backend = found.get("sharded_backend")
    if backend != "torch_dist":
        raise UnsupportedCheckpointError(
            f"this Megatron-Core checkpoint is saved with sharded_backend {brief(backend)}; only torch_dist is read",
            path=folder / MEGATRON_METADATA, hint="Re-save it with --ckpt-format torch_dist.")


def save_folder(path: Path) -> Path:
    """The save a claimed folder holds: itself, or NeMo's ``weights/`` or verl's ``dist_ckpt/`` in it (confined).

    Detection hands the reader the outer folder, so that the config and tokenizer beside the save (NeMo's
    ``context/``, verl's ``huggingface/``) are inside the folder whose assets are searched.
    """
    if is_megatron_folder(path):
        return path
    for name in SAVE_FOLDERS:
        if is_megatron_folder(path / name):
            return confine_chosen(path / name, path)
    return path


def _verl_megatron(path: Path) -> ResolvedCheckpoint | None:
    """verl's Megatron backend: a ``global_step_N`` holding ``actor/dist_ckpt``, or a run of them (the
    tracker's step, else the highest): its ``actor`` folder; None when there is none."""
    if is_megatron_folder(path / VERL_ACTOR):
        return ResolvedCheckpoint(confine_chosen(path / "actor", path), path.name, "verl Megatron actor")
    steps = sorted((int(m.group(1)), p) for p in _subfolders(path) if (m := _VERL_STEP.match(p.name))
                   and is_megatron_folder(p / VERL_ACTOR))
    if not steps:
        return None
    tracked = verl_tracked_step(path)
    step = next((p for n, p in steps if n == tracked), steps[-1][1])
    how = f"{step.name} from {TRACKER}" if tracked is not None and step.name == f"global_step_{tracked}" else (
        f"highest step: {step.name}")
    step = confine_chosen(step, path)
    return ResolvedCheckpoint(confine_chosen(step / "actor", step), step.name, f"{how}; verl Megatron actor")


def resolve_megatron(path: Path) -> ResolvedCheckpoint:
    """The ``torch_dist`` save an input refers to (see the module docstring).

    Raises:
        InputNotFoundError: Nothing here is a Megatron-Core save (not mine).
        CorruptCheckpointError: The run's tracker is broken.
        UnsupportedCheckpointError: The save uses another sharded backend (zarr).
        UnsafeInputError: A chosen folder is a symlink out of the input.
    """
    if is_megatron_folder(path):
        _check_backend(path)
        return ResolvedCheckpoint(path, path.name, "Megatron-Core torch_dist folder given directly")
    if (inner := save_folder(path)) != path:  # the reader reads it there; the assets beside it stay in reach
        _check_backend(inner)
        return ResolvedCheckpoint(path, path.name, f"Megatron-Core save in {inner.relative_to(path)}/")
    if (verl := _verl_megatron(path)) is not None:
        return verl
    if _is_run(path):
        chosen = _tracked(path)
        how = f"{chosen.name} from {TRACKER}" if chosen is not None else ""
        if chosen is None and (found := iterations(path)):
            chosen, how = confine_chosen(found[-1][1], path), f"highest iteration: {found[-1][1].name}"
        if chosen is not None:
            _check_backend(chosen)
            return ResolvedCheckpoint(chosen, chosen.name, how)
    raise InputNotFoundError("no Megatron-Core torch_dist checkpoint (metadata.json + .metadata) found", path=path)


def megatron_save_list(path: Path) -> SaveList | None:
    """A run's ``iter_N`` saves (or verl's ``global_step_N`` holding ``actor/dist_ckpt``); ``convert`` picks the
    tracker's, else the highest."""
    saves = [Checkpoint(p.name, n, p) for n, p in iterations(path)]
    if not saves:
        saves = [Checkpoint(p.name, int(m.group(1)), p) for p in sorted(_subfolders(path))
                 if (m := _VERL_STEP.match(p.name)) and is_megatron_folder(p / VERL_ACTOR)]
        saves.sort(key=lambda c: c.step or 0)
        tracked_step = verl_tracked_step(path)
        return SaveList(saves, next((c for c in saves if c.step == tracked_step), saves[-1])) if saves else None
    try:
        tracked = _tracked(path)
    except ConsolidateError:
        tracked = None
    return SaveList(saves, next((c for c in saves if tracked is not None and c.path == tracked), saves[-1]))


def asset_dirs(folder: Path) -> list[Path]:
    """verl's ``huggingface/``, NeMo's ``context/`` and Bridge's ``tokenizer/`` in the claimed folder, then the
    tokenizer folder NeMo's ``model.yaml`` names in ``context/`` (:func:`nemo_tokenizer_dir`)."""
    found = [folder / name for name in ASSET_FOLDERS if (folder / name).is_dir()]
    named = nemo_tokenizer_dir(folder)
    return found + [named] if named is not None and named not in found else found


def common_args(folder: Path, meta: dcp.DcpMetadata, root: Path) -> tuple[dict[str, Any] | None, Path, str]:
    """Megatron-LM's args, the file they are in and how to name where: from ``common.pt`` when the save has one
    (megatron-core up to 0.18; it wins, as in megatron-core's own load), else from the ``common_state`` object
    the metadata places in a ``.distcp`` file (0.19+). ``(None, ...)`` when neither holds args.

    Raises:
        UnsafeInputError: The storage file holding the object resolves outside the input.
        UnsafePickleError, CorruptCheckpointError, LimitExceededError: As the readers in
            :mod:`~vllm_consolidate.formats.megatron_common`.
    """
    if os.path.lexists(folder / COMMON_FILE) or COMMON_STATE_KEY not in meta.byte_storage:
        return read_args(folder), folder / COMMON_FILE, COMMON_FILE
    name, start, length = meta.byte_storage[COMMON_STATE_KEY]
    path = folder / name  # one plain name (formats.dcp); a link out of the input is refused like a shard's
    check_weight_file(path, [root])
    return read_common_state_args(path, start, length), path, f"{COMMON_STATE_KEY} in {name}"


class _Record(NamedTuple):
    """The save's own record of its model, as Megatron-LM ``args`` fields (:func:`_own_record`)."""

    where: Path  # the file
    label: str  # how ``layout_from`` names it
    source: str  # how errors name it
    args: dict[str, Any]
    no_vocab: str | None = None  # why nothing gave a vocabulary size the record lacks (NeMo's tokenizer)


def _own_record(outer: Path, folder: Path, root: Path, meta: dcp.DcpMetadata, names: set[str]) -> _Record | None:
    """Megatron-LM's args in ``common.pt`` or the ``common_state`` object of ``meta`` (:func:`common_args`),
    else Megatron-Bridge's ``run_config.yaml``, else NeMo's ``context/model.yaml`` (a null ``vocab_size``, as
    NeMo's Llama presets leave it, given by the size of NeMo's copy of the tokenizer when it can be); None."""
    args, where, what = common_args(folder, meta, root)
    if args is not None:
        return _Record(where, f"Megatron-LM args in {what}", "Megatron-LM's args", args)
    if (model := read_run_config(folder)) is not None:
        label = f"Megatron-Bridge {RUN_CONFIG_FILE}"
        return _Record(folder / RUN_CONFIG_FILE, label, f"the model fields of {label}",
                       args_from_run_config(model, names))
    if (model := read_nemo_model_yaml(outer)) is None:
        return None
    label, why = f"NeMo {NEMO_MODEL_YAML}", None
    if model.get("vocab_size") is None:
        model, label, why = nemo_tokenizer_vocab(outer, model, label, meta)
    return _Record(outer / NEMO_MODEL_YAML, label, f"the model fields of {label}", args_from_run_config(model, names),
                   f"the tokenizer does not give it: {why}" if why else None)


def find_layout(outer: Path, folder: Path, root: Path, base_model_name: str | None, names: set[str],
                meta: dcp.DcpMetadata) -> tuple[Layout, str, dict[str, Any] | None, Path | None]:
    """The head layout and true vocabulary size, where they came from, the config.json to write when the reader
    builds it (from args; None when a config.json is found, which convert then copies) and the file it is built
    from (None then too).

    In order: a config.json the checkpoint has (its folder and run, verl's ``huggingface/``, NeMo's
    ``context/``, found as convert finds the output's); the save's own record of its model (:func:`_own_record`:
    the trained model's own record, before a base model that may be the default one); ``--base-model-name``'s
    config.json. A record without the true vocabulary size (Megatron-LM's args without ``--vocab-size``, NeMo's
    Llama presets) comes after the base model, which must then describe the model the record describes.
    ``outer`` is the folder detection claimed, ``folder`` the save in it (:func:`save_folder`).

    Raises:
        ConfigNotFoundError: None of them gives the layout (exit 8), or the base model is another model.
    """
    own = find_checkpoint_assets(outer, root, asset_dirs(outer), None)  # as convert searches the claimed folder
    if own.config is not None:
        return layout_from_config(read_config(own.config), own.config), str(own.config), None, None
    record = _own_record(outer, folder, root, meta, names)
    vocab = record.args.get("vocab_size") if record is not None else None
    if record is not None and (type(vocab) is int and vocab > 0 or not base_model_name):
        layout, config = config_from_args(record.args, names, record.where, record.source, record.no_vocab)
        return layout, record.label, config, record.where
    base = find_checkpoint_assets(outer, root, asset_dirs(outer), base_model_name) if base_model_name else own
    if base.config is not None:
        config = read_config(base.config)
        layout = layout_from_config(config, base.config)
        if record is not None:
            check_base_agrees(record.args, layout, config, base.config, record.source)
        return layout, str(base.config), None, None
    if record is not None:  # the base gives nothing either: the record's own refusal names what is missing
        config_from_args(record.args, names, record.where, record.source, record.no_vocab)
    why = f" ({base.base_model_error})" if base.base_model_error else ""
    raise ConfigNotFoundError(f"found no config.json beside the checkpoint, no Megatron-LM args ({COMMON_FILE} or "
                              f"{COMMON_STATE_KEY.split('/')[0]}) or "
                              f"Bridge {RUN_CONFIG_FILE} or NeMo {NEMO_MODEL_YAML}, and no base model{why} to give "
                              "the head layout and vocabulary size", path=folder, hint=HINT_BASE)


def _segments(spec: TensorSpec, pick: Pick, ends: list[int] | None = None) -> list[Segment]:
    """The byte ranges of ``pick`` in the global tensor ``spec``, whose segments end at the byte offsets ``ends``
    (found here when not given: pass them for many picks of one tensor).

    Found by bisection, not by :func:`~vllm_consolidate.source.sub_segments` (a scan from the first segment): a
    stacked TP row-parallel weight is ~43k segments and 24 layers' picks scanned most of them each. The segments
    a range covers whole are the global tensor's own (a list slice: no object per segment, which cost more than the
    rest of the plan); only its ends may be cut. ``spec.segments`` is merged already (:func:`.chunks.assemble`), so
    two ranges can only join where one pick range meets the next.
    """
    size, segs = spec.dtype.itemsize, spec.segments
    ends = list(itertools.accumulate(s.nbytes for s in segs)) if ends is None else ends
    out: list[Segment] = []
    for start, count in pick.ranges:
        if count <= 0:
            continue
        first, end = start * size, (start + count) * size
        i, j = bisect.bisect_right(ends, first), bisect.bisect_left(ends, end)  # the segments holding both ends
        head, tail = segs[i], segs[j]
        cut = first - (ends[i] - head.nbytes)
        if i == j:
            if cut or end != ends[j]:
                head = tail = Segment(head.path, head.offset + cut, end - first)
        else:
            if cut:
                head = Segment(head.path, head.offset + cut, head.nbytes - cut)
            if end != ends[j]:
                tail = Segment(tail.path, tail.offset, tail.nbytes - (ends[j] - end))
        if out and out[-1].path == head.path and out[-1].offset + out[-1].nbytes == head.offset:
            out[-1] = Segment(head.path, out[-1].offset, out[-1].nbytes + head.nbytes)
        else:
            out.append(head)
        if i != j:
            out.extend(segs[i + 1:j])
            out.append(tail)
    return out


def _plan(tensors: dict[str, dcp.DcpTensor], names: dict[str, str], layout: Layout, where: Path) -> list[Pick]:
    """Every output tensor, from the metadata alone (so an unknown key is refused before any archive is read)."""
    out: list[Pick] = []
    seen: dict[str, str] = {}
    for key, tensor in tensors.items():
        with naming_file(where):
            for pick in picks(names[key], tensor.shape, layout):
                if pick.name in seen:
                    raise CorruptCheckpointError(f"{brief(seen[pick.name])} and {brief(key)} both give {pick.name}",
                                                 path=where)
                seen[pick.name] = key
                out.append(pick)
    return out


def read_megatron(folder: Path, root: Path | None = None, model_key: str | None = None,
                  base_model_name: str | None = None) -> SourceModel:
    """Describe the model weights of a Megatron-Core ``torch_dist`` save, under Hugging Face names.

    Args:
        folder: The save folder (``iter_NNNNNNN``).
        root: The folder the user named, which no file read may leave (default: ``folder``).
        model_key: Unused (Megatron-Core's keys say which are the model's).
        base_model_name: ``--base-model-name``: its config.json gives the layout when the checkpoint has none.

    Raises:
        ConfigNotFoundError: No config.json or args give the head layout and vocabulary size.
        UnsupportedCheckpointError: A model key is not understood (named).
        CorruptCheckpointError: Missing or truncated storage files, inconsistent metadata or shapes.
        UnsafePickleError: The metadata or a chunk's pickle is refused by the allowlist.
        UnsafeInputError: A storage file resolves outside the input.
    """
    outer = Path(folder)
    roots = [Path(root) if root is not None else outer]
    folder = save_folder(outer)
    check_weight_file(folder / dcp.METADATA_FILE, roots)
    meta = dcp.read_metadata(folder)
    names = {key: name for key in meta.tensors if (name := model_name(key)) is not None}
    key_of = {name: key for key, name in names.items()}
    if len(key_of) != len(names):
        raise CorruptCheckpointError("two entries have the same parameter name once wrapper prefixes are removed",
                                     path=meta.path)
    if not names:
        raise UnsupportedCheckpointError("this Megatron-Core checkpoint holds no model weights (only optimizer or "
                                         "other state)", path=meta.path)
    layout, layout_from, config, config_file = find_layout(outer, folder, roots[0], base_model_name,
                                                           set(names.values()), meta)
    entries = len(meta.tensors) + len(meta.byte_keys)
    meta.tensors = {key: meta.tensors[key] for key in names}  # only the model's files must be present
    planned = _plan(meta.tensors, names, layout, meta.path)
    check_storage_files(folder, meta, roots)
    check_layout(meta.tensors, meta.path)
    globals_: dict[str, TensorSpec] = {}
    for key in dict.fromkeys(p.key for p in planned):
        tensor = meta.tensors[key_of[key]]
        pieces = [_piece(folder, tensor, c) for c in tensor.chunks if math.prod(c.sizes)]
        with naming_file(meta.path):
            segments = assemble(tensor.shape, pieces, key) if pieces else []
        globals_[key] = TensorSpec(key, tensor.dtype, tensor.shape, segments)
    ends = {key: list(itertools.accumulate(s.nbytes for s in spec.segments)) for key, spec in globals_.items()}
    specs = [TensorSpec(p.name, globals_[p.key].dtype, p.shape, _segments(globals_[p.key], p, ends[p.key]))
             for p in planned]
    stored = stored_dtype(specs)
    # Megatron-Core keeps norm weights in fp32 under bf16 params: the matrices say how the model was trained.
    trained = stored_dtype([s for s in specs if len(s.shape) >= 2])
    info = {
        "type": "megatron",
        "layout_from": layout_from,
        "config_file": str(config_file) if config_file is not None else None,  # what a built config.json is from
        "heads": layout.heads,
        "query_groups": layout.groups,
        "head_dim": layout.head_dim,
        "vocab_size": layout.vocab_size,
        "storage_files": len(meta.files),
        "dropped_entries": entries - len(names),  # optimizer state, extra state, RNG, common state
        "stored_dtype": stored.name if stored else None,
    }
    return SourceModel(kind="megatron", path=folder, tensors=specs, asset_dirs=asset_dirs(outer), info=info,
                       trained_dtype=trained if trained and trained.itemsize == 2 else None, config=config)


__all__ = ["asset_dirs", "common_args", "find_layout", "is_megatron_folder", "iterations", "megatron_save_list",
           "nemo_tokenizer_dir", "read_megatron", "resolve_megatron"]
