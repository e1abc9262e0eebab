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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import (
    CorruptCheckpointError,
    InputNotFoundError,
    UnsupportedCheckpointError,
)
from vllm_consolidate.readers.torch_zip import Inert, TensorRef, load_lazy
from vllm_consolidate.source import Segment, SourceModel, TensorSpec

_OPTIM_RE = re.compile(r"^(?:(bf16|fp16)_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_Z3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_STEP_RE = re.compile(r"^(?:checkpoint-|global_step)(\d+)$")


def step_of(name: str) -> int | None:
    """N of a ``checkpoint-N`` or ``global_stepN`` folder name, else None."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def is_zero_checkpoint_folder(path: Path) -> bool:
    """True if ``path`` itself holds ``*_model_states.pt`` files (a ``global_stepN`` folder)."""
    return path.is_dir() and any(path.glob("*_model_states.pt"))


@dataclass
class ResolvedCheckpoint:
    """Which ``global_stepN`` folder an input resolved to, and how."""

    folder: Path
    tag: str
    how: str


def latest_checkpoint_folder(run_dir: Path) -> Path | None:
    """The ``checkpoint-N`` sub-folder with the highest N, or None."""
    candidates = [(s, p) for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
                  and (s := step_of(p.name)) is not None]
    return max(candidates)[1] if candidates else None


def resolve_checkpoint(path: Path) -> ResolvedCheckpoint:
    """Find the ZeRO ``global_stepN`` folder an input refers to.

    Accepts a training run folder (its latest ``checkpoint-N`` by step), a ``checkpoint-N`` folder,
    a folder with ``latest`` and ``global_stepN/``, or a ``global_stepN`` folder itself.

    Raises:
        InputNotFoundError: Nothing that looks like a ZeRO checkpoint is there.
        CorruptCheckpointError: ``latest`` names a tag that does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError("input does not exist", path=path)
    if not path.is_dir():
        raise InputNotFoundError("a DeepSpeed checkpoint is a folder, not a file", path=path)
    if is_zero_checkpoint_folder(path):
        return ResolvedCheckpoint(path, path.name, "global_step folder given directly")
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        folder = path / tag
        if not is_zero_checkpoint_folder(folder):
            raise CorruptCheckpointError(
                f"'latest' names the tag '{tag}', but {folder} holds no ZeRO checkpoint",
                path=latest,
                hint="Pass the global_stepN folder you want with --checkpoint-dir, or fix the 'latest' file.",
            )
        return ResolvedCheckpoint(folder, tag, f"tag '{tag}' from {latest}")
    steps = [(s, p) for p in path.iterdir() if p.name.startswith("global_step") and (s := step_of(p.name)) is not None
             and is_zero_checkpoint_folder(p)]
    if steps:
        folder = max(steps)[1]
        return ResolvedCheckpoint(folder, folder.name, "highest global_stepN (no 'latest' file)")
    ckpt = latest_checkpoint_folder(path)
    if ckpt is not None:
        inner = resolve_checkpoint(ckpt)
        inner.how = f"latest checkpoint by step: {ckpt.name}; {inner.how}"
        return inner
    raise InputNotFoundError(
        "no DeepSpeed ZeRO checkpoint found (no *_model_states.pt, 'latest', global_stepN/ or checkpoint-N/)",
        path=path,
    )


def _as_int(value: Any) -> int:
    if isinstance(value, Inert) and value.args:  # e.g. ZeroStageEnum(2)
        return int(value.args[0])
    if isinstance(value, (list, tuple)):
        return max(_as_int(v) for v in value)
    return int(value)


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


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in value)


def _require(mapping: Any, key: str, path: Path) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise CorruptCheckpointError(f"'{key}' is missing; this is not a DeepSpeed ZeRO checkpoint file", path=path)
    return mapping[key]


def read_deepspeed(folder: Path) -> SourceModel:
    """Describe the fp32 master weights of a ``global_stepN`` folder, reading metadata only.

    Args:
        folder: The ``global_stepN`` folder.

    Returns:
        A :class:`SourceModel` whose tensors point into the rank files.

    Raises:
        CorruptCheckpointError: Missing, truncated or inconsistent rank files.
        UnsupportedCheckpointError: Pipeline/tensor-parallel, or a ZeRO stage other than 1-3.
    """
    folder = Path(folder)
    optim_files: dict[int, Path] = {}
    for p in folder.iterdir():
        m = _OPTIM_RE.match(p.name)
        if m:
            if int(m.group(3)) != 0:
                raise UnsupportedCheckpointError(
                    "tensor/pipeline-parallel checkpoints (mp_rank > 0) are not supported", path=p
                )
            optim_files[int(m.group(2))] = p
    if not optim_files:
        placeholders = any(_Z3_MODEL_RE.match(p.name) for p in folder.iterdir())
        raise CorruptCheckpointError(
            "no *_optim_states.pt files: the fp32 master weights are missing"
            + ("; the ZeRO-3 *_model_states.pt files hold only empty placeholders" if placeholders else ""),
            path=folder,
            hint="Copy every rank's *_optim_states.pt file into this folder, or pick another checkpoint.",
        )
    first = optim_files[min(optim_files)]
    head = _require(load_lazy(first), "optimizer_state_dict", first)
    stage = _as_int(_require(head, "zero_stage", first))
    world_size = _as_int(_require(head, "partition_count", first))
    if stage not in (1, 2, 3):
        raise UnsupportedCheckpointError(
            f"ZeRO stage {stage} is not supported (only 1, 2 and 3 are)", path=first,
            hint="Convert it with DeepSpeed's own tools, or save it with ZeRO-1, 2 or 3.",
        )
    missing = [r for r in range(world_size) if r not in optim_files]
    if missing:
        r = missing[0]
        name = first.name.replace(f"zero_pp_rank_{min(optim_files)}_", f"zero_pp_rank_{r}_")
        raise CorruptCheckpointError(
            f"the checkpoint was saved by {world_size} ranks but the optimizer file of rank {r} is missing",
            path=folder / name,
            hint="Copy every rank's *_optim_states.pt file into this folder, or pick another checkpoint.",
        )
    extra = sorted(r for r in optim_files if r >= world_size)
    if extra:
        raise CorruptCheckpointError(
            f"world size mismatch: the checkpoint records {world_size} ranks but {len(optim_files)} "
            f"optimizer files are present (rank {extra[0]} is extra)",
            path=optim_files[extra[0]],
            hint="Remove stray rank files left from another run, or re-save the checkpoint.",
        )

    if stage <= 2:
        model_files = [folder / "mp_rank_00_model_states.pt"]
    else:
        model_files = [folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    for p in model_files:
        if not p.is_file():
            raise CorruptCheckpointError(
                "model states file is missing", path=p,
                hint="Copy every rank's *_model_states.pt file into this folder, or pick another checkpoint.",
            )
    model_states = [load_lazy(p) for p in model_files]
    ms0 = model_states[0]
    param_shapes = _require(ms0, "param_shapes", model_files[0])
    if isinstance(param_shapes, dict):
        param_shapes = [param_shapes]
    buffer_names = list(_require(ms0, "buffer_names", model_files[0]))
    module = ms0.get("module") or {}
    shared = dict(ms0.get("shared_params") or {})
    frozen_shapes = dict(ms0.get("frozen_param_shapes") or {})
    trained = _trained_dtype(ms0.get("ds_config"))

    # Per rank, the fp32 groups; rank 0's head was already loaded.
    groups_key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    flats: list[list[TensorRef]] = []
    paddings = None
    for r in range(world_size):
        path = optim_files[r]
        sd = head if r == min(optim_files) else _require(load_lazy(path), "optimizer_state_dict", path)
        if r == 0:
            paddings = sd.get("param_alignment_paddings")
        rank_ws = _as_int(_require(sd, "partition_count", path))
        if rank_ws != world_size:
            raise CorruptCheckpointError(
                f"world size mismatch: this rank file records {rank_ws} ranks, rank 0 records {world_size}",
                path=path, hint="The folder mixes files from different runs; re-save the checkpoint.",
            )
        groups = _require(sd, groups_key, path)
        if isinstance(groups, TensorRef):
            groups = [groups]
        flats.append(list(groups))

    specs: dict[str, TensorSpec] = {}
    if stage <= 2:
        _zero12_params(specs, param_shapes, flats, optim_files, paddings, world_size)
        for name, shape in frozen_shapes.items():
            frag = _require(ms0.get("frozen_param_fragments") or {}, name, model_files[0])
            specs[name] = TensorSpec(name, frag.dtype, _shape(shape), [frag.segment(0, math.prod(_shape(shape)))])
    else:
        _zero3_params(specs, param_shapes, flats, optim_files, world_size)
        for name, shape in frozen_shapes.items():
            shape = _shape(shape)
            frags = [_require(ms.get("frozen_param_fragments") or {}, name, p)
                     for ms, p in zip(model_states, model_files)]
            nbytes = math.prod(shape) * frags[0].dtype.itemsize
            segs = _truncate(_merge([f.segment() for f in frags]), nbytes)
            specs[name] = TensorSpec(name, frags[0].dtype, shape, segs)
    for name in buffer_names:
        ref = module.get(name)
        if isinstance(ref, TensorRef):
            specs[name] = TensorSpec(name, ref.dtype, ref.shape, [ref.segment()] if ref.numel else [])

    for spec in specs.values():
        have = sum(s.nbytes for s in spec.segments)
        if have != spec.nbytes:
            raise CorruptCheckpointError(
                f"{spec.name}: found {have} bytes, expected {spec.nbytes}", path=folder
            )

    # Order as the module's state dict did, then anything it did not list.
    order = [k for k in module if k in specs] + [k for k in specs if k not in module]
    aliases = {alias: target for alias, target in shared.items() if target in specs and alias not in specs}
    info = {
        "type": "deepspeed",
        "stage": stage,
        "world_size": world_size,
        "tag": folder.name,
        "ds_version": str(ms0.get("ds_version")),
        "trained_dtype": trained.name if trained else None,
        "rank_files": len(optim_files),
    }
    return SourceModel(
        kind="deepspeed",
        path=folder,
        tensors=[specs[k] for k in order],
        asset_dirs=[],
        trained_dtype=trained,
        info=info,
        aliases=aliases,
    )


def _zero12_params(specs, param_shapes, flats, optim_files, paddings, world_size) -> None:
    if len(param_shapes) != len(flats[0]):
        raise CorruptCheckpointError(
            f"{len(param_shapes)} parameter groups in the model states, "
            f"{len(flats[0])} fp32 groups in the optimizer",
            path=optim_files[0],
        )
    for g, shapes in enumerate(param_shapes):
        parts = [flats[r][g] for r in range(world_size)]
        vector = _Flat(parts, str(optim_files[0]))
        group_pad = paddings[g] if paddings is not None else None
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            shape = _shape(shape)
            numel = math.prod(shape)
            specs[name] = TensorSpec(name, dtypes.float32, shape, _merge(vector.segments(offset, numel)))
            offset += numel
            if group_pad is not None:
                offset += int(group_pad[i])
        # DeepSpeed pads each group to a multiple of 2*world_size; both counts must agree after that.
        align = 2 * world_size
        if math.ceil(offset / align) * align != math.ceil(vector.numel / align) * align:
            raise CorruptCheckpointError(
                f"group {g}: parameters take {offset} elements but the ranks hold {vector.numel}",
                path=optim_files[0],
            )


def _zero3_params(specs, param_shapes, flats, optim_files, world_size) -> None:
    merged: dict[str, tuple[int, ...]] = {}
    for shapes in param_shapes:
        for name, shape in shapes.items():
            merged[name] = _shape(shape)
    vectors = [_Flat(flats[r], str(optim_files[r])) for r in range(world_size)]
    sizes = {v.numel for v in vectors}
    if len(sizes) != 1:
        raise CorruptCheckpointError("ranks hold different amounts of fp32 data", path=optim_files[0])
    offset = 0
    for name, shape in merged.items():
        numel = math.prod(shape)
        per_rank = math.ceil(numel / world_size)
        segs: list[Segment] = []
        for v in vectors:
            segs.extend(v.segments(offset, per_rank))
        specs[name] = TensorSpec(name, dtypes.float32, shape, _truncate(_merge(segs), numel * 4))
        offset += per_rank
    if offset != vectors[0].numel:
        raise CorruptCheckpointError(
            f"parameters take {offset} elements per rank but each rank holds {vectors[0].numel}",
            path=optim_files[0],
        )
