"""Our torch-free casts against torch's ``Tensor.to``, bit for bit, over every input bit pattern we can afford.

Pure logic on synthetic bit patterns: this is what the writer uses for every dtype change.
"""

from __future__ import annotations

import pytest
import torch

from vllm_consolidate import casts, dtypes
from vllm_consolidate.casts import cast_into, numpy_castable

BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Low halves of float32 patterns that decide rounding to 16 bits: ties, one below and above them, for the
# bfloat16 cut (bit 16) and the float16 cut (bit 13), plus a fixed random spread. Every high half is swept
# with each, so every exponent (normal, subnormal, inf/NaN) and sign meets every rounding case. The full
# sweep of all 2**32 patterns passed once, and takes 8 minutes: bench/exhaustive_casts.py.
LOW_HALVES = sorted({0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2001, 0x3000, 0x5000, 0x6000,
                     0x7000, 0x7FFF, 0x8000, 0x8001, 0x9000, 0xA000, 0xC000, 0xE000, 0xF000, 0xFFFF,
                     *torch.randint(0, 1 << 16, (24,), generator=torch.Generator().manual_seed(1)).tolist()})


class PortableKernel:
    """The C extension with its float16 cast forced to the scalar rounding (what a CPU without F16C runs)."""

    def __init__(self, kernel):
        self.float32_to_bfloat16 = kernel.float32_to_bfloat16
        self.float32_to_float16 = kernel.float32_to_float16_portable


def built_kernel():
    kernel = casts.kernel()
    assert kernel is not None, "vllm_consolidate._castkernel is not built: reinstall with a C compiler"
    return kernel


@pytest.fixture(params=["c-kernel", "c-portable", "numpy"])
def cast_path(request, monkeypatch):
    """float32 -> 16 bits every way the package can cast: the C extension (built by every install with a C compiler,
    so by ``make test``: its absence here fails), its scalar float16 rounding (where the CPU lacks F16C), and the
    numpy fallback (forced by hiding the extension)."""
    if request.param == "numpy":
        monkeypatch.setattr(casts, "_kernel", None)
    elif request.param == "c-portable":
        monkeypatch.setattr(casts, "_kernel", PortableKernel(built_kernel()))
    else:
        built_kernel()
    return request.param


def ours(values: torch.Tensor, dst: dtypes.DType) -> torch.Tensor:
    src = dtypes.of(values.dtype)
    out = bytearray(values.numel() * dst.itemsize)
    cast_into(memoryview(values.view(BITS[src.itemsize]).numpy()).cast("B"), src, dst, memoryview(out))
    return torch.frombuffer(out, dtype=dst.torch)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, inputs: torch.Tensor) -> None:
    """Bit-identical except NaN, whose payload torch itself does not define (see casts.py)."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN must stay NaN, and only NaN may become NaN"
    bits = BITS[want.element_size()]
    diff = (got.view(bits) != want.view(bits)) & ~nan
    if bool(diff.any()):
        i = int(diff.nonzero()[0])
        raise AssertionError(f"{int(diff.sum())} values differ; first: input {inputs[i].item()!r} "
                             f"-> ours {got[i].item()!r}, torch {want[i].item()!r}")


def float32_patterns(low_halves: list[int]) -> torch.Tensor:
    high = torch.arange(0, 1 << 16, dtype=torch.int64) << 16
    patterns = (high[:, None] | torch.tensor(low_halves, dtype=torch.int64)[None, :]).flatten()
    return patterns.to(torch.int32).view(torch.float32)  # to(int32) wraps the top bit into the sign


@pytest.mark.parametrize("dst", [dtypes.bfloat16, dtypes.float16])
def test_float32_rounding_cases_for_every_exponent_and_sign(dst, cast_path):
    values = float32_patterns(LOW_HALVES)
    assert_same_bits(ours(values, dst), values.to(dst.torch), values)


@pytest.mark.parametrize("src", [dtypes.bfloat16, dtypes.float16])
@pytest.mark.parametrize("dst", [dtypes.float32, dtypes.float64, dtypes.float16, dtypes.bfloat16])
def test_every_16_bit_pattern(src, dst):
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(src.torch)
    assert_same_bits(ours(values, dst), values.to(dst.torch), values)


@pytest.mark.parametrize("dst", [dtypes.float32, dtypes.float16, dtypes.bfloat16])
def test_float64_rounds_like_torch(dst):
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(1 << 20, dtype=torch.float64, generator=gen) * 10.0 ** torch.randint(-45, 40, (1 << 20,),
                                                                                             generator=gen)
    # Doubles just beside float32 rounding ties: where rounding once or twice can differ.
    f32 = torch.randn(1 << 16, generator=gen).to(torch.float64)
    ulp = torch.nextafter(f32.to(torch.float32), torch.tensor(float("inf"))).to(torch.float64) - f32
    ties = torch.cat([f32 + ulp / 2, f32 + ulp / 2 + ulp * 2**-20, f32 + ulp / 2 - ulp * 2**-20])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-320, 3.4e38, 3.5e38, 65504.0,
                            65520.0, 65519.99, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001], dtype=torch.float64)
    values = torch.cat([normal, ties, special])
    assert_same_bits(ours(values, dst), values.to(dst.torch), values)


def test_pairs_outside_numpy_go_through_torch():
    values = torch.linspace(-500, 500, 4099)
    assert not numpy_castable(dtypes.float32, dtypes.float8_e4m3fn)
    got = ours(values, dtypes.float8_e4m3fn)
    assert torch.equal(got.view(torch.uint8), values.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("dst", [dtypes.bfloat16, dtypes.float16])
def test_c_kernel_on_unaligned_odd_sized_chunks(dst, cast_path):
    """The writer hands the kernel slices of its buffers: any offset, any element count (the C loops have a
    vector body and a scalar tail; an offset of 2 bytes makes every load unaligned)."""
    gen = torch.Generator().manual_seed(3)
    raw = torch.randint(-(1 << 31), 1 << 31, (4099,), dtype=torch.int64, generator=gen).to(torch.int32)
    buf = bytearray(2) + bytearray(raw.numpy().tobytes())
    for count in (0, 1, 7, 8, 9, 31, 4097):
        values = raw[:count].view(torch.float32)
        out = bytearray(2 * count)
        cast_into(memoryview(buf)[2:2 + 4 * count], dtypes.float32, dst, memoryview(out))
        assert_same_bits(torch.frombuffer(out, dtype=dst.torch) if count else torch.empty(0, dtype=dst.torch),
                         values.to(dst.torch), values)


def test_c_kernel_refuses_mismatched_buffers():
    kernel = built_kernel()
    for fn in (kernel.float32_to_bfloat16, kernel.float32_to_float16):
        with pytest.raises(ValueError, match="2\\*n output bytes"):
            fn(bytes(8), bytearray(3))
        with pytest.raises(ValueError, match="4\\*n source bytes"):
            fn(bytes(6), bytearray(3))


def test_version_says_how_casts_run(monkeypatch, capsys):
    """A build without a C compiler casts with numpy, silently: ``--version`` is where a user sees it."""
    from vllm_consolidate.cli import build_parser

    built_kernel()
    for kernel, want in ((casts.kernel(), "casts: C extension"), (None, "casts: numpy (the C extension")):
        monkeypatch.setattr(casts, "_kernel", kernel)
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["--version"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("vllm-consolidate ") and want in out, out
