"""Reader for DeepSpeed ZeRO-1/2/3 checkpoints, without DeepSpeed.

Layout of a ``global_stepN/`` folder (DeepSpeed >= 0.x):

* ZeRO-1/2: ``mp_rank_00_model_states.pt`` holds the module's non-parameter state (buffers), the
  parameter names and shapes per optimizer group (``param_shapes``), frozen parameters in full
  (``frozen_param_fragments``) and ``shared_params``. One ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``
  per rank holds, per group, that rank's slice of the flat fp32 master vector
  (``single_partition_of_fp32_groups``). Concatenating the ranks' slices gives the group's flat vector;
  parameters follow each other in it, separated by ``param_alignment_paddings`` when recorded.
* ZeRO-3: one ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank, with that rank's slice of each
  frozen parameter; per rank ``fp32_flat_groups``. Every parameter is cut into ``ceil(numel / W)``
  elements per rank, padded at the end; the slices sit at the same offset in each rank's flat vector.

We only unpickle metadata (see :mod:`.torch_zip`) and turn each parameter into the byte ranges that
hold it, so nothing but the fp32 masters is ever read, and only once.

Untrusted input: rank and model-states files must be regular files and, symlinks resolved, lie inside
the folder the user named (a link out is an :class:`UnsafeInputError`; which folder is chosen, and
how ``latest`` is read, is in :mod:`.zero_locate`). Every number in the pickles is type-checked and
compared with the files before it sizes anything, and each rank file must be its own rank's: see
:mod:`.zero_checks` and :mod:`.zero_slices` (ZeRO-1/2 files are refused only on proof from their
sizes or bytes; fields DeepSpeed itself ignores give warnings, in ``info["warnings"]``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import CorruptCheckpointError, UnsafeInputError, UnsupportedCheckpointError
from vllm_consolidate.formats.torch_zip import TensorRef, load_lazy
from vllm_consolidate.limits import MAX_DIM, brief, checked_shape, is_int
from vllm_consolidate.read import zero_checks as zc
from vllm_consolidate.read.zero_locate import (  # re-exported: detection, batch and bench import them from here
    ResolvedCheckpoint,
    confine_chosen,
    is_zero_checkpoint_folder,
    latest_checkpoint_folder,
    resolve_checkpoint,
    step_of,
)
from vllm_consolidate.read.zero_slices import Zero12Group, check_zero12_rank
from vllm_consolidate.safe_io import confined, open_source
from vllm_consolidate.source import Segment, SourceModel, TensorSpec

_OPTIM_RE = re.compile(r"^(?:(bf16|fp16)_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_Z3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
#: Any model-states file: ZeRO-3's per rank, or ZeRO-1/2's one ``mp_rank_NN_model_states.pt`` (rank 0).
_MODEL_STATES_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_\d+_model_states\.pt$")
_COPY_RANKS_HINT = "Copy every rank's *_optim_states.pt file into this folder, or pick another checkpoint."


def _trained_dtype(ds_config: Any) -> DType | None:
    if not isinstance(ds_config, dict):
        return None
    for key, dtype in (("bf16", dtypes.bfloat16), ("bfloat16", dtypes.bfloat16), ("fp16", dtypes.float16)):
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get("enabled") in (True, "true", "True"):
            return dtype
    return dtypes.float32


class _Flat:
    """A list of flat 1-D tensors on one rank, seen as one vector; maps element ranges to segments."""

    def __init__(self, parts: list[TensorRef], path: str):
        self.parts = parts
        self.path = path
        self.starts = [0]
        for part in parts:
            if len(part.shape) != 1:
                raise CorruptCheckpointError("flat fp32 group is not 1-D", path=path)
            self.starts.append(self.starts[-1] + part.numel)

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def segments(self, start: int, count: int) -> list[Segment]:
        if start < 0 or start + count > self.numel:
            raise CorruptCheckpointError(
                f"parameter data [{start}, {start + count}) lies outside the rank's {self.numel} elements",
                path=self.path,
            )
        out: list[Segment] = []
        for i, part in enumerate(self.parts):
            lo, hi = self.starts[i], self.starts[i + 1]
            a, b = max(start, lo), min(start + count, hi)
            if a < b:
                out.append(part.segment(a - lo, b - a))
        return out


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join byte ranges that follow each other in the same file."""
    out: list[Segment] = []
    for seg in segments:
        if seg.nbytes == 0:
            continue
        if out and out[-1].path == seg.path and out[-1].offset + out[-1].nbytes == seg.offset:
            out[-1] = Segment(seg.path, out[-1].offset, out[-1].nbytes + seg.nbytes)
        else:
            out.append(seg)
    return out


def _truncate(segments: list[Segment], nbytes: int) -> list[Segment]:
    out: list[Segment] = []
    left = nbytes
    for seg in segments:
        if left <= 0:
            break
        take = min(seg.nbytes, left)
        out.append(Segment(seg.path, seg.offset, take))
        left -= take
    return out


_RankStates = tuple[Path, dict, list[TensorRef]]  # (optimizer file, its optimizer_state_dict, its flat groups)


@dataclass
class _ModelStates:
    """What the model-states file(s) declare, type-checked (see :mod:`.zero_checks`)."""

    files: list[Path]
    groups: list[dict[str, tuple[int, ...]]]
    buffer_names: list[str]
    module: dict[str, Any]
    shared: dict[str, str]
    frozen_shapes: dict[str, tuple[int, ...]]
    frozen: list[dict[str, TensorRef]]  # per model-states file
    trained: DType | None
    ds_version: str


def _load(path: Path, roots: list[Path]) -> Any:
    """Unpickle a rank file that is a regular file inside the checkpoint.

    A rank file that is a symlink resolving outside ``roots`` is refused: it would feed weights from
    elsewhere on the machine into the output. One linking to another file inside the checkpoint is
    followed (the copy checks then apply to what it points to).
    """
    if not confined(path, roots):
        raise UnsafeInputError(
            f"rank file resolves to {os.path.realpath(path)}, outside the checkpoint "
            f"{', '.join(str(r) for r in roots)}; refusing to read it", path=path,
            hint="Copy the real file into the checkpoint folder (a link out of the input is never followed).")
    open_source(path).close()  # load_lazy opens with a blocking open(): refuse a FIFO first
    return load_lazy(path)


def _optim_files(folder: Path) -> dict[int, Path]:
    """The ``*_optim_states.pt`` file of each rank; two for one rank (``bf16_`` and plain) is an error."""
    found: dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        m = _OPTIM_RE.match(p.name)
        if not m:
            continue
        if int(m.group(3)) != 0:
            raise UnsupportedCheckpointError("tensor/pipeline-parallel checkpoints (mp_rank > 0) are not supported",
                                             path=p)
        rank = int(m.group(2))
        if rank in found:
            raise CorruptCheckpointError(
                f"two optimizer files for rank {rank}: {found[rank].name} and {p.name}", path=p,
                hint="Remove the one left from another run (its precision prefix differs), or re-save the checkpoint.")
        found[rank] = p
    if not found:
        placeholders = any(_Z3_MODEL_RE.match(p.name) for p in folder.iterdir())
        raise CorruptCheckpointError(
            "no *_optim_states.pt files: the fp32 master weights are missing"
            + ("; the ZeRO-3 *_model_states.pt files hold only empty placeholders" if placeholders else ""),
            path=folder, hint=_COPY_RANKS_HINT)
    return found


def _check_rank_set(optim_files: dict[int, Path], world: int, folder: Path) -> None:
    """Exactly ranks ``0 .. world-1`` are present, checked without ever looping ``world`` times."""
    present = len(optim_files)
    # With world > present some rank <= present is missing, so the search is bounded by the files.
    missing = next((r for r in range(min(world, present + 1)) if r not in optim_files), None)
    if missing is not None:
        name = optim_files[min(optim_files)].name.replace(f"zero_pp_rank_{min(optim_files)}_",
                                                          f"zero_pp_rank_{missing}_")
        raise CorruptCheckpointError(
            f"the checkpoint was saved by {brief(world)} ranks but the optimizer file of rank {missing} is missing",
            path=folder / name, hint=_COPY_RANKS_HINT)
    extra = sorted(r for r in optim_files if r >= world)
    if extra:
        raise CorruptCheckpointError(
            f"world size mismatch: the checkpoint records {world} ranks but {present} "
            f"optimizer files are present (rank {extra[0]} is extra)",
            path=optim_files[extra[0]],
            hint="Remove stray rank files left from another run, or re-save the checkpoint.",
        )


def _model_states(folder: Path, stage: int, world: int, roots: list[Path]) -> _ModelStates:
    if stage <= 2:
        files = [folder / "mp_rank_00_model_states.pt"]
    else:
        files = [folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    for p in files:
        if not os.path.lexists(p):
            raise CorruptCheckpointError(
                "model states file is missing", path=p,
                hint="Copy every rank's *_model_states.pt file into this folder, or pick another checkpoint.")
    states = [zc.str_keyed(_load(p, roots), p.name, p) for p in files]
    ms0, p0 = states[0], files[0]
    buffer_names = zc.require(ms0, "buffer_names", p0)
    if not isinstance(buffer_names, (list, tuple)) or not all(isinstance(n, str) for n in buffer_names):
        raise CorruptCheckpointError(f"buffer_names is {brief(buffer_names)}, not a list of names", path=p0)
    version = ms0.get("ds_version")
    return _ModelStates(
        files=files,
        groups=zc.param_shapes(zc.require(ms0, "param_shapes", p0), p0),
        buffer_names=list(buffer_names),
        module=zc.str_keyed(ms0.get("module"), "module", p0),
        shared=zc.str_keyed(ms0.get("shared_params"), "shared_params", p0, values=str),
        frozen_shapes=zc.shapes_of(ms0.get("frozen_param_shapes"), "frozen_param_shapes", p0),
        frozen=[zc.str_keyed(ms.get("frozen_param_fragments"), "frozen_param_fragments", p, values=TensorRef)
                for ms, p in zip(states, files)],
        trained=_trained_dtype(ms0.get("ds_config")),
        ds_version=version if isinstance(version, str) else brief(version, 40),
    )


def _rank_states(optim_files: dict[int, Path], head: dict, stage: int, world: int,
                 roots: list[Path]) -> list[_RankStates]:
    """Each rank's optimizer state and flat fp32 groups, in rank order; its recorded stage and world size checked."""
    key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    out: list[_RankStates] = []
    for r in range(world):
        path = optim_files[r]
        sd = head if r == 0 else zc.require(_load(path, roots), "optimizer_state_dict", path)
        if not isinstance(sd, dict):
            raise CorruptCheckpointError(f"optimizer_state_dict is {brief(sd)}, not a dict", path=path)
        rank_ws = zc.partition_count(zc.require(sd, "partition_count", path), path)
        if rank_ws != world:
            raise CorruptCheckpointError(
                f"world size mismatch: this rank file records {rank_ws} ranks, rank 0 records {world}",
                path=path, hint="The folder mixes files from different runs; re-save the checkpoint.")
        rank_stage = zc.zero_stage(zc.require(sd, "zero_stage", path), path)
        if rank_stage != stage:
            raise CorruptCheckpointError(
                f"this rank file records ZeRO stage {rank_stage}, rank 0 records {stage}", path=path,
                hint="The folder mixes files from different runs; re-save the checkpoint.")
        out.append((path, sd, zc.flat_groups(zc.require(sd, key, path), key, path)))
    return out


def read_deepspeed(folder: Path, root: Path | None = None) -> SourceModel:
    """Describe the fp32 master weights of a ``global_stepN`` folder, reading metadata only.

    Every rank and model-states file must be a regular file that, symlinks resolved, lies inside
    ``root``. Every number the pickles declare is checked before it sizes anything, and each rank
    file must hold its own rank's slice (see :mod:`.zero_checks` and :mod:`.zero_slices`).

    Args:
        folder: The ``global_stepN`` folder.
        root: The folder the user named, which rank files must not leave (default: ``folder``).

    Returns:
        A :class:`SourceModel` whose tensors point into the rank files.

    Raises:
        CorruptCheckpointError: Missing, truncated, inconsistent, duplicated or mixed-up rank files.
        UnsupportedCheckpointError: Pipeline/tensor-parallel, or a ZeRO stage other than 1-3.
        UnsafeInputError: A rank file resolves outside ``root``.
    """
    folder = Path(folder)
    roots = [Path(root) if root is not None else folder]
    optim_files = _optim_files(folder)
    first = optim_files[min(optim_files)]
    head = zc.require(_load(first, roots), "optimizer_state_dict", first)
    stage = zc.zero_stage(zc.require(head, "zero_stage", first), first)
    world = zc.partition_count(zc.require(head, "partition_count", first), first)
    if stage not in (1, 2, 3):
        raise UnsupportedCheckpointError(
            f"ZeRO stage {brief(stage)} is not supported (only 1, 2 and 3 are)", path=first,
            hint="Convert it with DeepSpeed's own tools, or save it with ZeRO-1, 2 or 3.",
        )
    _check_rank_set(optim_files, world, folder)
    ms = _model_states(folder, stage, world, roots)
    ranks = _rank_states(optim_files, head, stage, world, roots)
    zc.check_distinct([(path, flats) for path, _, flats in ranks])
    if stage == 3 and ms.frozen_shapes:  # ZeRO-3 keeps each rank's slice of the frozen parameters per rank
        zc.check_distinct([(p, list(fr.values())) for p, fr in zip(ms.files, ms.frozen)])
    warnings: list[str] = []
    specs = _zero12_params(ms, ranks, world, warnings) if stage <= 2 else _zero3_params(ms, ranks, world)
    _add(specs, _buffers(ms), folder)
    for spec in specs.values():
        have = sum(s.nbytes for s in spec.segments)
        if have != spec.nbytes:
            raise CorruptCheckpointError(f"{brief(spec.name)}: found {have} bytes, expected {spec.nbytes}", path=folder)
    # Order as the module's state dict did, then anything it did not list.
    order = [k for k in ms.module if k in specs] + [k for k in specs if k not in ms.module]
    aliases = {alias: target for alias, target in ms.shared.items() if target in specs and alias not in specs}
    info = {
        "type": "deepspeed",
        "stage": stage,
        "world_size": world,
        "tag": folder.name,
        "ds_version": ms.ds_version,
        "trained_dtype": ms.trained.name if ms.trained else None,
        "rank_files": len(optim_files),
        **({"warnings": warnings} if warnings else {}),  # read by convert and inspect
    }
    return SourceModel(kind="deepspeed", path=folder, tensors=[specs[k] for k in order], asset_dirs=[],
                       trained_dtype=ms.trained, info=info, aliases=aliases)


def _add(specs: dict[str, TensorSpec], more: dict[str, TensorSpec], where: Path) -> None:
    """Add ``more`` to ``specs``; a name declared twice (two groups, frozen and trained) is an error."""
    for name, spec in more.items():
        if name in specs:
            raise CorruptCheckpointError(f"parameter {brief(name)} is declared twice in the model states", path=where)
        specs[name] = spec


def _buffers(ms: _ModelStates) -> dict[str, TensorSpec]:
    out: dict[str, TensorSpec] = {}
    for name in ms.buffer_names:
        ref = ms.module.get(name)
        if isinstance(ref, TensorRef):
            shape = checked_shape(ref.shape, what=f"buffer {brief(name)}", path=ms.files[0])
            out[name] = TensorSpec(name, ref.dtype, shape, [ref.segment()] if ref.numel else [])
    return out


def _paddings(sd: dict, groups: list[dict[str, tuple[int, ...]]], path: Path) -> list[list[int]] | None:
    """ZeRO-1/2 ``param_alignment_paddings`` (one non-negative int per parameter), or None if not recorded."""
    value = sd.get("param_alignment_paddings")
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == len(groups) and all(
        isinstance(p, (list, tuple)) and len(p) == len(g) and all(is_int(x) and 0 <= x <= MAX_DIM for x in p)
        for p, g in zip(value, groups))
    if not ok:
        raise CorruptCheckpointError(
            f"param_alignment_paddings is {brief(value)}, not one small padding per parameter", path=path)
    return [list(p) for p in value]


def _zero12_params(ms: _ModelStates, ranks: list[_RankStates], world: int,
                   warnings: list[str]) -> dict[str, TensorSpec]:
    """The trained and frozen parameters of a ZeRO-1/2 checkpoint, once each rank is shown to hold its own slice.

    The rank checks' warnings (advisory fields that disagree, see :mod:`.zero_slices`) are appended to ``warnings``.
    """
    path0, sd0, flats0 = ranks[0]
    for path, _, flats in ranks:
        if len(flats) != len(ms.groups):
            raise CorruptCheckpointError(
                f"{len(ms.groups)} parameter groups in the model states, {len(flats)} fp32 groups in the optimizer",
                path=path)
    paddings = _paddings(sd0, ms.groups, path0)
    layouts = [Zero12Group.of(shapes, paddings[g] if paddings else None, world)
               for g, shapes in enumerate(ms.groups)]
    files = [path for path, _, _ in ranks]
    for r, (_, sd, flats) in enumerate(ranks):
        warnings.extend(check_zero12_rank(sd, r, files, layouts, flats, ms.module))
    specs: dict[str, TensorSpec] = {}
    for g, (shapes, layout) in enumerate(zip(ms.groups, layouts)):
        vector = _Flat([flats[g] for _, _, flats in ranks], str(path0))
        group = {name: TensorSpec(name, dtypes.float32, shape, _merge(vector.segments(start, numel)))
                 for (name, shape), start, numel in zip(shapes.items(), layout.starts, layout.numels)}
        _add(specs, group, path0)
    frozen = {}
    for name, shape in ms.frozen_shapes.items():
        frag = zc.require(ms.frozen[0], name, ms.files[0])
        frozen[name] = TensorSpec(name, frag.dtype, shape, [frag.segment(0, math.prod(shape))])
    _add(specs, frozen, ms.files[0])
    return specs


def _zero3_params(ms: _ModelStates, ranks: list[_RankStates], world: int) -> dict[str, TensorSpec]:
    """The trained and frozen parameters of a ZeRO-3 checkpoint: each rank holds ``ceil(numel / W)`` of each."""
    merged: dict[str, tuple[int, ...]] = {}
    for shapes in ms.groups:
        _add(merged, shapes, ms.files[0])
    per_rank = sum(math.ceil(math.prod(shape) / world) for shape in merged.values())
    vectors = []
    for path, _, flats in ranks:
        vector = _Flat(flats, str(path))
        if vector.numel != per_rank:  # checked before any byte range is built
            raise CorruptCheckpointError(
                f"this rank file holds {vector.numel} fp32 elements, but the parameter shapes give each rank "
                f"{per_rank}; it is from another run or damaged", path=path)
        vectors.append(vector)
    specs: dict[str, TensorSpec] = {}
    offset = 0
    for name, shape in merged.items():
        numel = math.prod(shape)
        share = math.ceil(numel / world)
        segs: list[Segment] = []
        for v in vectors:
            segs.extend(v.segments(offset, share))
        specs[name] = TensorSpec(name, dtypes.float32, shape, _truncate(_merge(segs), numel * 4))
        offset += share
    frozen = {}
    for name, shape in ms.frozen_shapes.items():
        share = math.ceil(math.prod(shape) / world)
        frags = [zc.require(fr, name, p) for fr, p in zip(ms.frozen, ms.files)]
        for frag, p in zip(frags, ms.files):
            if frag.numel != share or frag.dtype != frags[0].dtype:
                raise CorruptCheckpointError(
                    f"frozen {brief(name)}: this rank holds {frag.numel} {frag.dtype.name} elements, "
                    f"expected {share} {frags[0].dtype.name}", path=p)
        segs = _truncate(_merge([f.segment() for f in frags]), math.prod(shape) * frags[0].dtype.itemsize)
        frozen[name] = TensorSpec(name, frags[0].dtype, shape, segs)
    _add(specs, frozen, ms.files[0])
    return specs


def rank_files(folder: Path) -> dict[str, list[int]] | None:
    """Ranks of the optimizer and model-states files present, from their names only (survives a failed read)."""
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError:
        return None
    optim = sorted(int(m.group(2)) for n in names if (m := _OPTIM_RE.match(n)))
    states = sorted(int(m.group(1) or 0) for n in names if (m := _MODEL_STATES_RE.match(n)))
    return {"optimizer": optim, "model_states": states}


__all__ = [
    "ResolvedCheckpoint", "confine_chosen", "is_zero_checkpoint_folder", "latest_checkpoint_folder", "rank_files",
    "read_deepspeed", "resolve_checkpoint", "step_of",
]
