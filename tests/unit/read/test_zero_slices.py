"""The ZeRO-1/2 rank identity rules of :mod:`vllm_consolidate.read.zero_slices`, against DeepSpeed's and torch's code.

The corpus tests (``tests/test_convert_deepspeed.py``, ``tests/test_hostile_readers.py``) run the checks on
real checkpoints; these compare the two rules they rest on with their sources, on many more layouts and
values than a corpus holds: which names DeepSpeed records per rank (its ``_round_robin_reorder`` and
``_init_lp_to_hp_mapping``), and the cast from an fp32 master to the saved weight (torch's ``Tensor.to``).
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_consolidate import dtypes
from vllm_consolidate.read.zero_slices import Zero12Group, cast_equals


def _deepspeed_names(params: list[torch.Tensor], names: dict[int, str], start: int, size: int,
                     offsets: list[int] | None) -> set[str]:
    """The names DeepSpeed 0.19 puts in a rank's ``param_slice_mappings``: the parameters it links to that rank."""
    from deepspeed.utils.mixed_precision_linkage import _init_lp_to_hp_mapping

    linked = _init_lp_to_hp_mapping(params, start, size, None, param_offsets=offsets)
    return {names[id(p)] for p, _ in linked}


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("seed", range(8))
def test_slice_names_are_the_names_deepspeed_records(world: int, seed: int) -> None:
    """Both name sets :meth:`Zero12Group.slice_names` accepts are what DeepSpeed's own code records.

    ``param_shapes`` (and the flat data) follow ``_round_robin_reorder``'s order; DeepSpeed links the
    parameters in the module's order, at the flat offsets when it has them (a group with alignment
    padding) and at offsets counted in the module's order when it has none.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    rng = random.Random(seed)
    params = [torch.empty(rng.choice([0, 1, 5, 8, 64, 301, 1001])) for _ in range(rng.randint(1, 14))]
    names = {id(p): f"p{i}" for i, p in enumerate(params)}
    reordered, _ = DeepSpeedZeroOptimizer._round_robin_reorder(None, params, world)
    group = Zero12Group.of({names[id(p)]: tuple(p.shape) for p in reordered}, None, world)
    flat_offset = {id(p): start for p, start in zip(reordered, group.starts)}
    for rank in range(world):
        by_flat, by_module = group.slice_names(rank, world)
        start = rank * group.size
        assert by_flat == _deepspeed_names(params, names, start, group.size, [flat_offset[id(p)] for p in params])
        assert by_module == _deepspeed_names(params, names, start, group.size, None)


def test_padded_group_has_one_name_set() -> None:
    """With alignment padding DeepSpeed links at the flat offsets, so only the flat order is accepted."""
    group = Zero12Group.of({"a": (3,), "b": (2,), "c": (4,)}, [1, 0, 0], 2)
    assert group.padded and len(group.slice_names(0, 2)) == 1
    assert (group.n, group.size, group.share(0), group.share(1)) == (10, 6, 6, 4)


def test_locate_skips_paddings_and_empty_parameters() -> None:
    group = Zero12Group.of({"a": (3,), "pad_after_a": (0,), "b": (2,), "last": (0,)}, [1, 0, 0, 0], 2)
    assert [group.locate(pos) for pos in range(7)] == [
        ("a", 3, 0), ("a", 3, 1), ("a", 3, 2), None, ("b", 2, 0), ("b", 2, 1), None]


def _bits(values: torch.Tensor) -> list[int]:
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32}[values.element_size()]
    mask = (1 << (8 * values.element_size())) - 1
    return [b & mask for b in values.view(width).tolist()]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cast_equals_is_torchs_cast(dtype: str) -> None:
    """Every sampled fp32 pattern (random, and the rounding, overflow, subnormal and NaN edges) casts as torch does."""
    edges = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x477FEFFF, 0x477FF000, 0x477FF001, 0xC77FF000,
             0x33800000, 0x33000000, 0x33000001, 0x387FC000, 0x00000001, 0x3F808000, 0x3F818000, 0x3F80C000,
             0x7FC00000, 0x7F800001, 0xFFFFFFFF]
    rand = torch.randint(0, 2**32, (50_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    masters = edges + rand.tolist()
    values = torch.tensor([m - 2**32 if m >= 2**31 else m for m in masters], dtype=torch.int32).view(torch.float32)
    saved = _bits(values.to(getattr(torch, dtype)))
    ours = getattr(dtypes, dtype)
    assert all(cast_equals(m, ours, s) for m, s in zip(masters, saved))
    not_nan = [(m, s) for m, s, v in zip(masters, saved, values.tolist()) if v == v]
    assert not any(cast_equals(m, ours, s ^ 1) for m, s in not_nan), "a wrong weight must not be taken for the cast"
