"""Block / tile FP8 quantization math (posttrain.fp8.quant)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.fp8.quant import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_blockwise,
    dequantize_tilewise_act,
    e4m3_error_bound,
    expand_scale,
    quantize_blockwise,
    quantize_tilewise_act,
    round_scale_to_pow2,
    scale_to_float32,
)

# Bound slack: only the fp32 rounding of w / s and q * s on top of e4m3's half-ulp.
SLACK = 1 + 1e-5


def _blocky_weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random weight whose 128x128 blocks differ in magnitude by up to 10^±3, so that a block
    read with the wrong scale (e.g. a mis-inferred block size) is off by orders of magnitude,
    and heavy tails put some values into e4m3's subnormal range."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape[-2], shape[-1]
    grid = (*shape[:-2], math.ceil(rows / 128), math.ceil(cols / 128))
    mags = 10.0 ** torch.randint(-3, 4, grid, generator=g).float()
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 6
    return w * expand_scale(mags, shape, (128, 128))


@pytest.mark.parametrize("shape", [(576, 896), (200, 130), (256, 384), (3, 130, 260)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_blockwise_roundtrip_within_e4m3_bound(shape, scale_fmt):
    w = _blocky_weight(shape)
    q, s = quantize_blockwise(w, scale_fmt=scale_fmt)
    grid = (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == grid
    d = dequantize_blockwise(q, s, out_dtype=torch.float32)
    bound = e4m3_error_bound(w, expand_scale(s, shape, (128, 128)))
    err = (d - w).abs()
    assert bool((err <= bound * SLACK).all()), f"worst err/bound {(err / bound).max():.4f}"
    # the bound is tight: a coarser format (or a scale off by 2x) would break it somewhere
    assert float((err / bound).max()) > 0.5

    amax = w.abs().reshape(-1).new_zeros(grid)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in grid]).reshape(-1, len(grid)).tolist():
        *lead, i, j = idx
        amax[tuple(idx)] = w[(*lead, slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))].abs().max()
    if scale_fmt is None:
        torch.testing.assert_close(s, amax / FP8_MAX, rtol=2e-7, atol=0)
    else:
        assert torch.equal(s, torch.exp2(torch.log2(s).round())), "ue8m0 scales must be powers of two"
        assert bool((s >= amax / FP8_MAX).all()) and bool((s < 2 * amax / FP8_MAX).all())
    assert float(q.float().abs().max()) <= FP8_MAX


def test_576x7168_scale_grid_and_partial_last_block():
    """kv_a_proj_with_mqa: 576 rows -> 5 row blocks, the last one 64 rows (4 full + 1 partial)."""
    q = torch.ones(576, 7168).to(FP8_DTYPE)
    s = torch.arange(1, 5 * 56 + 1, dtype=torch.float32).reshape(5, 56)
    d = dequantize_blockwise(q, s, out_dtype=torch.float32)
    assert d.shape == (576, 7168)
    rows = torch.arange(576) // 128
    cols = torch.arange(7168) // 128
    assert torch.equal(d, s[rows][:, cols])
    assert float(d[575, 7167]) == 5 * 56 and float(d[512, 0]) == 4 * 56 + 1
    with pytest.raises(ValueError, match="scale grid"):
        dequantize_blockwise(q, torch.ones(4, 56))  # 576 // 128 = 4 is the wrong (floor) grid


def test_zero_block_and_nonfinite():
    w = torch.zeros(130, 260)
    w[:128, :128] = torch.randn(128, 128)
    q, s = quantize_blockwise(w, scale_fmt="ue8m0")
    assert float(s[1, 0]) == 1.0 and float(s[0, 2]) == 1.0  # all-zero blocks: scale 1
    assert float(q[128:].float().abs().sum()) == 0.0
    assert torch.equal(dequantize_blockwise(q, s, out_dtype=torch.float32)[:, 128:], w[:, 128:])
    w[3, 3] = float("inf")
    with pytest.raises(ValueError, match="inf/nan"):
        quantize_blockwise(w)


def test_tilewise_activation_quantization():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 300, generator=g) * (10.0 ** torch.randint(-2, 3, (3, 5, 1), generator=g).float())
    q, s = quantize_tilewise_act(x)
    assert q.shape == x.shape and s.shape == (3, 5, 3)
    for j, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 300)]):
        torch.testing.assert_close(s[..., j], x[..., lo:hi].abs().amax(-1) / FP8_MAX, rtol=2e-7, atol=0)
    d = dequantize_tilewise_act(q, s)
    full = s.repeat_interleave(128, -1)[..., :300]
    assert bool(((d - x).abs() <= e4m3_error_bound(x, full) * SLACK).all())
    _, s2 = quantize_tilewise_act(x, scale_fmt="ue8m0")
    assert torch.equal(s2, torch.exp2(torch.log2(s2).round()))


def test_round_scale_to_pow2_exact():
    s = torch.tensor([1.0, 0.75, 0.5, 3e-5, 2.0**-20, 5.0, 2.0**-126, 1.0000001])
    want = torch.tensor([1.0, 1.0, 0.5, 2.0**-15, 2.0**-20, 8.0, 2.0**-126, 2.0])
    assert torch.equal(round_scale_to_pow2(s), want)


def test_scale_dtypes_read_as_float32():
    ref = torch.tensor([[2.0**-10, 1.0], [4.0, 2.0**-3]])
    assert torch.equal(scale_to_float32(ref.to(torch.float8_e8m0fnu)), ref)
    assert torch.equal(scale_to_float32(torch.tensor([[117, 127], [129, 124]], dtype=torch.uint8)), ref)
