"""The numpy kernels of ``convert --quantize`` (``write/quantize.py``) give torch's bits on edge values.

``convert --quantize`` imports no torch: it redoes compressed-tensors' torch arithmetic with numpy. Here the
kernels meet torch itself: the FP8 E4M3 cast on every bfloat16 and float16 value and on a million float32 bit
patterns, and the whole row quantizer on weights built to hit the edges (zero rows and so an epsilon scale,
subnormals, values on a rounding tie after the division, NaN and infinities, rows that saturate, shapes that
are not a multiple of the 128x128 block), for every scheme and working dtype. The torch side is
compressed-tensors 0.19's computation as the byte tests (``tests/test_quantize.py``) tie it to llm-compressor's
output, and ``test_edge_weights_as_llm_compressor`` runs llm-compressor itself on such weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_consolidate import dtypes
from vllm_consolidate.plan.quantize import SCHEMES, Scheme
from vllm_consolidate.write.quantize import float8_e4m3fn_bits, from_bytes, quantize_rows


def torch_quantize(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors 0.19's ``calculate_qparams`` + ``quantize`` of a block of rows, in torch."""
    qmin, qmax = torch.tensor(scheme.qmin), torch.tensor(scheme.qmax)
    rows, cols = w.shape
    if scheme.block is None:
        lo, hi = torch.amin(w, dim=-1, keepdim=True), torch.amax(w, dim=-1, keepdim=True)
    else:
        b = scheme.block
        pad_r, pad_c = -rows % b, -cols % b
        padded = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r)) if pad_r or pad_c else w
        blocks = padded.reshape((rows + pad_r) // b, b, (cols + pad_c) // b, b)
        lo, hi = torch.amin(blocks, dim=(1, 3)), torch.amax(blocks, dim=(1, 3))
    lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    absmax = torch.max(torch.abs(lo), torch.abs(hi))
    scale = absmax / ((qmax - qmin).to(absmax.dtype) / 2)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    per_elem = scale if scheme.block is None else scale.repeat_interleave(scheme.block, 0).repeat_interleave(
        scheme.block, 1)[:rows, :cols]
    scaled = w / per_elem
    scaled += torch.zeros((), dtype=w.dtype)  # the symmetric zero point
    scaled = torch.clamp(scaled, qmin, qmax)
    q = scaled.to(torch.float8_e4m3fn) if scheme.kind == "float" else torch.round(scaled).to(torch.int8)
    return q, scale


def ours(w: torch.Tensor, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """Our kernel on the same weights (given as their bytes, like the writer reads them)."""
    work = dtypes.of(w.dtype)
    values = from_bytes(memoryview(w.contiguous().view(-1).view(torch.uint8).numpy()), work)
    return quantize_rows(values.reshape(w.shape), scheme, work)


def edge_weights(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random weights with rows that hit the kernels' edges (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    tiny = torch.finfo(dtype).tiny
    w[0] = 0  # zero row: the scale is eps
    w[1] = torch.tensor(tiny) * torch.arange(cols).remainder(7).sub(3)  # subnormal-ish multiples of tiny
    w[2, :] = 0
    w[2, ::3] = torch.finfo(dtype).smallest_normal / 4  # subnormal
    w[3] = torch.arange(cols).remainder(33).sub(16).to(dtype) * 0.5  # halves: ties after / scale
    w[3, 0] = 16 * 127.5 / 127.5  # absmax 16: w/s lands on x.5 for INT8
    w[4, 5] = float("nan")
    w[5, 7] = float("inf")
    w[6, 9] = -float("inf")
    w[7] = torch.finfo(dtype).max * torch.linspace(-1, 1, cols)  # overflow risk in the division
    w[8, :] = -1e-3
    w[8, 3] = 1e-3  # absmax from the negative side
    w[9] = w[9] * 1e4
    w[10, ::2] = -0.0  # -0 / scale stays -0 until the zero point is added
    return w


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def test_fp8_cast_every_16_bit_value() -> None:
    """float8_e4m3fn_bits of every bfloat16 and float16 value (widened to float32) is torch's ``.to``."""
    every = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        values = every.view(dtype)
        want = bits(values.to(torch.float8_e4m3fn))
        got = float8_e4m3fn_bits(values.float().numpy())
        diff = np.flatnonzero(got != want)
        assert diff.size == 0, (dtype, [(hex(int(every[i]) & 0xFFFF), got[i], want[i]) for i in diff[:5]])


def test_fp8_cast_float32_patterns() -> None:
    """...and of a million random float32 bit patterns plus the boundaries (448, 464, 480, inf, NaN, 2**-9)."""
    g = torch.Generator().manual_seed(1)
    u = torch.randint(-2**31, 2**31 - 1, (1_000_000,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([448.0, 463.99, 464.0, 464.01, 479.99, 480.0, float("inf"), float("nan"), 2.0**-9,
                            2.0**-10, 3 * 2.0**-11, 2.0**-6, 0.0, -0.0, 1e-40])
    values = torch.cat([u.view(torch.float32), special, -special])
    assert np.array_equal(float8_e4m3fn_bits(values.numpy()), bits(values.to(torch.float8_e4m3fn)))


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(12, 300), (130, 257), (256, 128)])
def test_quantize_rows_as_torch(scheme: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """The whole row quantizer, bit for bit, on weights with every edge row, per scheme and working dtype."""
    w = edge_weights(*shape, dtype)
    q, scale = ours(w, SCHEMES[scheme])
    tq, tscale = torch_quantize(w, SCHEMES[scheme])
    assert np.array_equal(scale.astype(np.float64), tscale.double().numpy(), equal_nan=True)
    assert_same_codes(q, tq, SCHEMES[scheme])


def assert_same_codes(q: np.ndarray, tq: torch.Tensor, scheme: Scheme) -> None:
    """Equal bytes, except that a NaN code's sign is not compared: torch itself writes 0x7f or 0xff for the
    same NaN depending on whether the element went through its SIMD loop or the scalar tail."""
    a, b = q.view(np.uint8).reshape(-1), bits(tq)
    if scheme.kind == "float":
        nan_a, nan_b = (a & 0x7F) == 0x7F, (b & 0x7F) == 0x7F
        assert np.array_equal(nan_a, nan_b)
        a, b = np.where(nan_a, 0x7F, a), np.where(nan_b, 0x7F, b)
    assert np.array_equal(a, b), np.flatnonzero(a != b)[:10]


def test_kernel_tests_can_fail() -> None:
    """A plausible slip (INT8 scale absmax / 127, FP8 without saturation) is seen by the comparisons above."""
    w = edge_weights(12, 300, torch.bfloat16)
    q, _ = ours(w, SCHEMES["w8a8"])
    wrong = torch.round(torch.clamp(w / (w.abs().amax(dim=1, keepdim=True) / 127), -128, 127)).to(torch.int8)
    assert not np.array_equal(q.view(np.uint8).reshape(-1), bits(wrong))
    big = np.array([500.0, float("inf")], dtype=np.float32)
    assert list(float8_e4m3fn_bits(big)) == [0x7E, 0x7E]  # saturation, as torch 2.13 (older torch: NaN)
    assert list(float8_e4m3fn_bits(np.array([float("nan"), -float("nan")], dtype=np.float32))) == [0x7F, 0xFF]


@pytest.mark.slow
def test_edge_weights_as_llm_compressor(tmp_path: Path) -> None:
    """llm-compressor itself (oneshot, its venv) on a tiny Llama whose every Linear weight is :func:`edge_weights`
    (bf16): our kernel gives its stored weights and scales, for each scheme (NaN codes up to their sign)."""
    from safetensors.torch import load_file
    from tests.test_quantize import run_llmc
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=320, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for i, (name, module) in enumerate(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(edge_weights(*module.weight.shape, torch.bfloat16, seed=i))
    model.save_pretrained(str(tmp_path / "bf16"))
    source = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    run_llmc([[str(tmp_path / "bf16"), str(tmp_path / s), s] for s in SCHEMES])
    for name, scheme in SCHEMES.items():
        theirs = load_file(str(tmp_path / name / "model.safetensors"))
        quantized = [k for k in theirs if k.endswith(".weight_scale")]
        assert len(quantized) == 7, quantized
        for key in quantized:
            weight = key.removesuffix("_scale")
            q, scale = ours(source[weight], scheme)
            assert np.array_equal(scale.astype(np.float64), theirs[key].double().numpy(), equal_nan=True), key
            assert_same_codes(q, theirs[weight], scheme)
