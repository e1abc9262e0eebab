"""The LoRA merge's row blocks (issue 22, item 0): any block of rows has the bits of peft's whole product.

BLAS computes a product of a few rows with other kernels than a product of many (MKL on AVX2: 1, 2, 3, 5, 6 or 7
rows differ from the same rows of a 1001-row product, in the last bit of about one element in ten). The writer
merges blocks of thousands of rows, while validation recomputes the first, middle and last row alone, so a
merge computed in the rows asked for made validation fail on a correct output (``peft_plain_qwen2``: "lm_head.weight
differs from the source in 112 of 384 compared elements"). :func:`merged_rows` cuts every block from fixed tiles.

These tests build the factors in memory (no corpus) and compare bits: every block partition against the whole
product computed as peft computes it (``weight + transpose(B @ A) * scale``), for a tensor in one tile and for one
cut into several tiles.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_consolidate import dtypes
from vllm_consolidate.plan import lora_rows as lora
from vllm_consolidate.source import Delta, Segment, TensorSpec

ROWS, COLS, RANK = 1001, 128, 8  # the shape of peft_plain_qwen2's lm_head, whose validation failed


def _spec(path: Path, name: str, t: torch.Tensor) -> TensorSpec:
    path.write_bytes(t.contiguous().numpy().tobytes())
    return TensorSpec(name, dtypes.float32, tuple(t.shape), [Segment(str(path), 0, t.numel() * 4)])


def _case(tmp_path: Path, transpose: bool) -> tuple[TensorSpec, torch.Tensor]:
    """A merged weight's spec and the whole merge as peft computes it (``get_delta_weight``, then ``+=``)."""
    gen = torch.Generator().manual_seed(45)
    weight = torch.randn(ROWS, COLS, generator=gen)
    a_shape, b_shape = ((RANK, ROWS), (COLS, RANK)) if transpose else ((RANK, COLS), (ROWS, RANK))
    a, b = 0.05 * torch.randn(a_shape, generator=gen), 0.05 * torch.randn(b_shape, generator=gen)
    scale = 16 / RANK
    delta = b @ a
    want = weight.clone()
    want += (delta.T if transpose else delta) * scale
    spec = _spec(tmp_path / "w.bin", "w", weight)
    spec.delta = Delta(_spec(tmp_path / "a.bin", "a", a), _spec(tmp_path / "b.bin", "b", b), scale, transpose)
    return spec, want


def _merge_in_blocks(spec: TensorSpec, sizes: list[int]) -> torch.Tensor:
    """The merged weight, asking :func:`merged_rows` for blocks of ``sizes`` rows in turn (cycled)."""
    weight = torch.frombuffer(bytearray(Path(spec.segments[0].path).read_bytes()), dtype=torch.float32)
    weight = weight.reshape(spec.shape)
    out, row, i = [], 0, 0
    while row < ROWS:
        rows = min(sizes[i % len(sizes)], ROWS - row)
        base = memoryview(weight[row:row + rows].contiguous().numpy()).cast("B")
        got = lora.merged_rows(spec, row, rows, base)
        out.append(torch.frombuffer(bytearray(got), dtype=torch.float32).reshape(rows, COLS))
        row, i = row + rows, i + 1
    return torch.cat(out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("transpose", [False, True], ids=["linear", "embedding"])
@pytest.mark.parametrize("sizes", [[ROWS], [1], [2], [3], [5, 7, 1], [1000, 1]], ids=str)
def test_blocks_have_the_bits_of_the_whole_product(tmp_path, transpose: bool, sizes: list[int]) -> None:
    """In one tile (the tensor fits :data:`TILE_BYTES`): every partition gives peft's bits exactly."""
    spec, want = _case(tmp_path, transpose)
    got = _merge_in_blocks(spec, sizes)
    assert torch.equal(_bits(got), _bits(want)), f"{int((_bits(got) != _bits(want)).sum())} elements differ"


@pytest.mark.parametrize("transpose", [False, True], ids=["linear", "embedding"])
def test_tiled_blocks_agree_with_each_other(tmp_path, monkeypatch, transpose: bool) -> None:
    """Cut into tiles of 128 rows (the last one moved back): the writer's blocks and the validator's single
    rows are the same bits, and here (MKL, AVX2) also peft's whole product."""
    monkeypatch.setattr(lora, "TILE_BYTES", 128 * COLS * 4, raising=False)
    spec, want = _case(tmp_path, transpose)
    written = _merge_in_blocks(spec, [300])
    for sizes in ([1], [3], [5, 64, 2]):
        assert torch.equal(_bits(_merge_in_blocks(spec, sizes)), _bits(written)), sizes
    assert torch.equal(_bits(written), _bits(want))
    assert lora.tile_rows(spec) == 128  # several tiles were cut


def test_the_callers_rows_are_not_changed(tmp_path) -> None:
    """The tiles are added to a copy: the writer's read buffer (float32 base rows) keeps the base's bytes."""
    spec, _ = _case(tmp_path, False)
    raw = bytearray(Path(spec.segments[0].path).read_bytes()[:10 * COLS * 4])
    before = bytes(raw)
    lora.merged_rows(spec, 0, 10, memoryview(raw))
    assert bytes(raw) == before
