"""Which rank's slice a ZeRO-1/2 rank file holds: a rank file copied over another, or two swapped, give
wrong weights that look fine.

What DeepSpeed's own ``zero_to_fp32.py`` (0.19) consolidates from, and so what is authoritative here:
rank 0's ``zero_stage``, ``partition_count`` and ``param_alignment_paddings``; every rank's
``single_partition_of_fp32_groups``, concatenated in rank order; the model states' ``param_shapes``
(their order is the flat vector's), ``buffer_names``, the buffers in ``module``, ``shared_params``,
``frozen_param_shapes`` and ``frozen_param_fragments``. It ignores ``param_slice_mappings``,
``group_paddings``, the other ranks' copies of the stage and count, and the module's saved
low-precision weights. So a rank file is refused only on proof from what it physically holds:

1. **Sizes.** Rank ``r`` holds exactly ``min(P, max(0, n - r*P))`` elements of each group, where
   ``n`` is the group's element count with the per-parameter alignment paddings and
   ``P = ceil(n / 2W) * 2W / W`` its partition size (DeepSpeed pads the flat group to a multiple
   of ``2 * world_size``, cuts it into ``W`` equal parts, and saves the last without its padding).
2. **Bytes.** ZeRO-1/2 save the whole module's low-precision weights, each the round-to-nearest
   cast of its fp32 master. :data:`SLICE_SAMPLES` elements spread over the file's slice are cast
   and compared with the saved weights at rank ``r``'s positions. All agreeing: the file is rank
   ``r``'s. Otherwise, if at least :data:`MIN_PROOF` of them, not all one value, agree with another
   rank's positions, the file is that rank's, and it is refused. Neither: a warning (DeepSpeed
   does not compare them, and we know no real checkpoint where they differ).

``param_slice_mappings`` (DeepSpeed >= 0.7, the names of the parameters each rank's slice touches)
is advisory: under ``round_robin_gradients`` DeepSpeed 0.19 writes it in the module's parameter
order while ``param_shapes`` and the flat data follow the round-robin order, so it names the wrong
parameters (issue 22). It is compared only when the bytes cannot confirm the file, with both orders
accepted; a disagreement is a warning, never a refusal.

A swap of two files with equal shares whose weights the module does not hold cannot be proved, and
is at most a warning. An identical copy is caught by :func:`.zero_checks.check_distinct` first.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import ConsolidateError, CorruptCheckpointError
from vllm_consolidate.formats.torch_zip import TensorRef
from vllm_consolidate.safe_io import open_source
from vllm_consolidate.storage.bytefile import ByteFile

#: Elements of each rank's slice of each group compared with the saved module weights (rule 2).
SLICE_SAMPLES = 16
#: Elements that must agree, not all one value, to call a file another rank's (rule 2).
MIN_PROOF = 4
_CAST = (dtypes.float32, dtypes.bfloat16, dtypes.float16)
_MIXED_HINT = "The folder mixes or duplicates rank files; copy every rank's own file from where training saved it."
_CHECK = "so it was not refused; if the output looks wrong, check that every rank file is from this run"


def zero12_layout(numels: list[int], paddings: list[int] | None, world: int) -> tuple[int, int]:
    """``(n, P)`` of a ZeRO-1/2 group: its element count with alignment paddings, and its partition size."""
    n = sum(numels) + sum(paddings or ())
    align = 2 * world
    return n, math.ceil(n / align) * align // world


def _cumulative(numels: Iterable[int]) -> list[int]:
    starts, offset = [], 0
    for numel in numels:
        starts.append(offset)
        offset += numel
    return starts


@dataclass(frozen=True)
class Zero12Group:
    """Where each parameter of a ZeRO-1/2 group lies in its flat vector (``param_shapes`` order), and how it is cut.

    Attributes:
        names: The parameter names, in ``param_shapes`` order (the flat vector's order).
        numels: Their element counts.
        starts: Where each begins in the flat vector (after the alignment paddings before it).
        padded: Whether any alignment padding is recorded.
        n: The group's element count with paddings.
        size: The partition size ``P``: rank ``r`` holds ``[r*P, (r+1)*P)`` of ``[0, n)``.
    """

    names: list[str]
    numels: list[int]
    starts: list[int]
    padded: bool
    n: int
    size: int

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]], paddings: list[int] | None, world: int) -> Zero12Group:
        """The layout of a group from its ``param_shapes``, its ``param_alignment_paddings`` and the world size."""
        numels = [math.prod(s) for s in shapes.values()]
        starts = _cumulative(numel + (paddings[i] if paddings else 0) for i, numel in enumerate(numels))
        n, size = zero12_layout(numels, paddings, world)
        return cls(list(shapes), numels, starts, any(paddings or ()), n, size)

    def share(self, rank: int) -> int:
        """How many elements rank ``rank`` holds (its tail padding is not saved)."""
        return min(self.size, max(0, self.n - rank * self.size))

    def locate(self, pos: int) -> tuple[str, int, int] | None:
        """``(name, numel, index)`` of the element at ``pos`` of the flat vector; None in a padding."""
        i = bisect.bisect_right(self.starts, pos) - 1
        while i >= 0 and not self.numels[i]:  # an empty parameter starts where the next one does
            i -= 1
        if i < 0 or pos >= self.starts[i] + self.numels[i]:
            return None
        return self.names[i], self.numels[i], pos - self.starts[i]

    def slice_names(self, rank: int, world: int) -> tuple[set[str], ...]:
        """The name sets DeepSpeed may record in rank ``rank``'s ``param_slice_mappings``, by its own rule.

        A parameter is in a slice if ``start <= offset < end`` or ``offset < start < offset + numel``
        (``_init_lp_to_hp_mapping``), empty ones never. The first set counts offsets in the flat
        vector's order. Under ``round_robin_gradients`` DeepSpeed 0.19 counts them in the module's
        order when the group has no alignment padding (``param_offsets=None``): the second set
        undoes the reordering (``_round_robin_reorder``: every ``W``-th parameter, from each of the
        first ``W`` in turn).
        """
        sets = [_touching(self.names, self.numels, self.starts, rank, self.size)]
        if not self.padded and world > 1:
            m = len(self.names)
            moved = [i for j in range(world) for i in range(j, m, world)]  # flat position -> module position
            order = [0] * m
            for k, i in enumerate(moved):
                order[i] = k
            numels = [self.numels[k] for k in order]
            sets.append(_touching([self.names[k] for k in order], numels, _cumulative(numels), rank, self.size))
        return tuple(sets)


def _touching(names: list[str], numels: list[int], starts: list[int], rank: int, size: int) -> set[str]:
    start, end = rank * size, (rank + 1) * size
    return {name for name, numel, offset in zip(names, numels, starts)
            if numel and (start <= offset < end or offset < start < offset + numel)}


def check_zero12_rank(sd: dict, rank: int, files: list[Path], groups: list[Zero12Group], flats: list[TensorRef],
                      module: dict[str, Any]) -> list[str]:
    """Rank ``rank``'s file holds rank ``rank``'s slice of every group, as far as sizes and bytes prove.

    Args:
        sd: The rank's ``optimizer_state_dict``.
        rank: The rank its file name gives.
        files: Every rank's optimizer file, in rank order (the world size is their number).
        groups: The layout of each parameter group.
        flats: The rank's flat fp32 groups.
        module: The model states' ``module`` (the saved low-precision weights), entries not yet type-checked.

    Returns:
        Warnings: the advisory disagreements, each naming the file.

    Raises:
        CorruptCheckpointError: The bytes show the file is another rank's, or its size is not this rank's share.
    """
    world, path = len(files), files[rank]
    unmatched, misnamed = [], []  # groups whose bytes match no rank's weights; whose names no layout gives
    for g, group in enumerate(groups):
        owner, compared = slice_owner(files, rank, group, flats[g], module) if world > 1 else (rank, True)
        if owner is not None and owner != rank:
            raise CorruptCheckpointError(
                f"{path.name} holds rank {owner}'s slice (the one {files[owner].name} should hold), not rank "
                f"{rank}'s (group {g}): its fp32 masters are rank {owner}'s saved weights; the rank files are "
                "copied or swapped", path=path, hint=_MIXED_HINT)
        if flats[g].numel != group.share(rank):
            raise CorruptCheckpointError(
                f"group {g}: {path.name} holds {flats[g].numel} elements, but the parameter shapes give rank {rank} "
                f"{group.share(rank)}; it is another rank's file or from another run", path=path, hint=_MIXED_HINT)
        if owner == rank:
            continue  # its bytes are rank `rank`'s: what param_slice_mappings says no longer matters
        if compared:
            unmatched.append(g)
        mapped = _mapped_names(sd, g, len(groups))
        if mapped is not None and mapped not in group.slice_names(rank, world):
            misnamed.append(g)
    warnings = []
    if unmatched:
        warnings.append(f"{path.name}: the fp32 masters of {_groups(unmatched)} are not the saved weights of rank "
                        f"{rank}'s range, nor of any other rank's; DeepSpeed does not compare them, {_CHECK}")
    if misnamed:
        warnings.append(f"{path.name}: param_slice_mappings of {_groups(misnamed)} names other parameters than "
                        f"rank {rank}'s range holds; DeepSpeed does not use it to consolidate and the sizes agree, "
                        f"{_CHECK}")
    return warnings


def _groups(numbers: list[int]) -> str:
    return f"group {numbers[0]}" if len(numbers) == 1 else f"groups {', '.join(map(str, numbers))}"


def _mapped_names(sd: dict, g: int, count: int) -> set[str] | None:
    """The names in group ``g`` of ``param_slice_mappings``, or None when it is absent or not one dict per group."""
    mappings = sd.get("param_slice_mappings")
    if not isinstance(mappings, (list, tuple)) or len(mappings) != count or not isinstance(mappings[g], dict):
        return None
    return {k for k in mappings[g] if isinstance(k, str)}


class _Bits:
    """Reads single elements' bits from the files of one check, each file opened once (regular files only)."""

    def __init__(self) -> None:
        self.files: dict[str, ByteFile] = {}

    def __enter__(self) -> _Bits:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()

    def get(self, ref: TensorRef, index: int) -> int | None:
        """The bits of element ``index`` of ``ref``, or None if the file ends before it."""
        seg = ref.segment(index, 1)
        src = self.files.get(seg.path)
        if src is None:
            src = self.files[seg.path] = open_source(seg.path)
        try:
            data = src.pread(seg.nbytes, seg.offset)
        except OSError as exc:
            raise CorruptCheckpointError(f"cannot read file: {exc.strerror or exc}", path=seg.path) from exc
        return int.from_bytes(data, "little") if len(data) == seg.nbytes else None


def slice_owner(files: list[Path], rank: int, group: Zero12Group, flat: TensorRef,
                module: dict[str, Any]) -> tuple[int | None, bool]:
    """Whose slice of ``group`` the file of rank ``rank`` holds, told by its bytes (rule 2 of the module docstring).

    Elements in alignment padding, or of parameters the module does not hold as a readable float
    tensor of the right size, are not compared. Other ranks' positions are tried only when rank
    ``rank``'s disagree.

    Returns:
        ``(owner, compared)``: the rank whose slice it is, or None when no element could be compared
        (``compared`` False) or they agree with no rank's weights (``compared`` True).
    """
    share = group.share(rank)
    offsets = sorted({i * share // SLICE_SAMPLES for i in range(SLICE_SAMPLES)})
    with _Bits() as bits:
        masters = {j: m for j in offsets if j < flat.numel and (m := bits.get(flat, j)) is not None}

        def agree(k: int) -> tuple[int, bool, set[int]]:
            """How many elements were compared at rank ``k``'s positions, whether all agree, their saved values."""
            count, seen = 0, set()
            for j, master in masters.items():
                pos = k * group.size + j
                found = group.locate(pos) if pos < group.n else None
                ref = module.get(found[0]) if found else None
                if not isinstance(ref, TensorRef) or ref.numel != found[1] or ref.dtype not in _CAST:
                    continue
                try:  # the saved weights are advisory: one we cannot read is not compared, never refused
                    saved = bits.get(ref, found[2])
                except ConsolidateError:
                    continue
                if saved is None:
                    continue
                if not cast_equals(master, ref.dtype, saved):
                    return count, False, seen
                count, seen = count + 1, seen | {saved}
            return count, True, seen

        count, same, _ = agree(rank)
        if same:
            return (rank if count else None), bool(count)
        for k in range(len(files)):
            if k != rank:
                count, same, seen = agree(k)
                if same and count >= MIN_PROOF and len(seen) > 1:
                    return k, True
    return None, True


def cast_equals(master: int, dtype: DType, saved: int) -> bool:
    """Whether fp32 bits ``master``, cast to ``dtype`` as torch casts (round to nearest even), are ``saved``.

    Any NaN equals any NaN: torch's NaN payload depends on its code path (see :mod:`vllm_consolidate.casts`).
    """
    if master & 0x7F800000 == 0x7F800000 and master & 0x7FFFFF:
        return _is_nan(saved, dtype)
    if dtype == dtypes.float32:
        return master == saved
    if dtype == dtypes.bfloat16:
        return (master + 0x7FFF + ((master >> 16) & 1)) >> 16 & 0xFFFF == saved
    value = struct.unpack("<f", master.to_bytes(4, "little"))[0]
    try:
        half = int.from_bytes(struct.pack("<e", value), "little")  # rounds to nearest even
    except OverflowError:  # beyond float16's range torch gives an infinity
        half = 0xFC00 if value < 0 else 0x7C00
    return half == saved


def _is_nan(bits: int, dtype: DType) -> bool:
    exp, frac = {dtypes.float32: (0x7F800000, 0x7FFFFF), dtypes.bfloat16: (0x7F80, 0x7F),
                 dtypes.float16: (0x7C00, 0x3FF)}[dtype]
    return bits & exp == exp and bool(bits & frac)


__all__ = ["MIN_PROOF", "SLICE_SAMPLES", "Zero12Group", "cast_equals", "check_zero12_rank", "slice_owner",
           "zero12_layout"]
