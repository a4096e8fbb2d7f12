"""The Hopper FP8 fast path (``F.scaled_mm`` with DeepSeek block scales) against torch's exact input contract.

No GPU here: :mod:`fp8_torch_contract` replaces ``F.scaled_mm`` with a CPU stand-in that raises what
torch 2.11+ raises for a wrong shape / stride / dtype (the ``ValueError: scale_b must have strides (1, 12);
got [56, 1]`` the H100 run hit in the dgrad GEMM of 8 of the 9 V3 shapes) and otherwise computes the
product from the scale layout the kernel reads. The fast path is forced on (it is normally probed on
CUDA SM90 only), and the layer's three GEMMs (forward, dgrad, wgrad; DeepSeek-V3 report §3.3.2, Figure 7)
run through it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import ScalingType

from fp8_torch_contract import ContractViolation, FakeScaledMM
from posttrain.fp8 import gemm
from posttrain.fp8.gemm import BlockQuantized
from posttrain.fp8.linear import fp8_linear

# (name, out_features N, in_features K) of DeepSeek-V3's FP8 Linears: issue #13's nine shapes
V3_SHAPES = [
    ("q_a_proj", 1536, 7168),
    ("q_b_proj", 24576, 1536),
    ("kv_a_proj_with_mqa", 576, 7168),
    ("kv_b_proj", 32768, 512),
    ("o_proj", 7168, 16384),
    ("expert gate|up", 2048, 7168),
    ("expert down", 7168, 2048),
    ("dense gate|up", 18432, 7168),
    ("dense down", 7168, 18432),
]
SHAPE_IDS = [name.replace(" ", "_").replace("|", "_") for name, _, _ in V3_SHAPES]
SMALL_M = 16  # tokens: the contract does not depend on M beyond its padding to 16 (and to 128 in wgrad)
U32 = 2.0**-24  # unit roundoff of float32


def test_the_nine_shapes_are_those_of_the_deepseek_v3_config():
    """bench_gpu.py takes its shapes from the config (fp8.layout.fp8_linear_shapes); they are the issue's nine,
    and with no q LoRA (Moonlight) one q_proj stands for q_a and q_b."""
    from posttrain.fp8.layout import fp8_linear_shapes
    from posttrain.presets import preset_config

    assert fp8_linear_shapes(preset_config("deepseek-v3")) == V3_SHAPES
    moonlight = fp8_linear_shapes(preset_config("moonlight-16b"))
    assert moonlight[0] == ("q_proj", 16 * 192, 2048) and [s[0] for s in moonlight[1:]] == [s[0] for s in V3_SHAPES[2:]]


@pytest.fixture
def fake_scaled_mm(monkeypatch):
    fake = FakeScaledMM()
    monkeypatch.setattr(F, "scaled_mm", fake)
    monkeypatch.setattr(gemm, "_fast_path_available", lambda device: True)
    return fake


@pytest.mark.parametrize("name, n, k", V3_SHAPES, ids=SHAPE_IDS)
def test_three_gemms_of_fp8_linear_meet_the_scaled_mm_contract_on_v3_shapes(fake_scaled_mm, name, n, k):
    """Forward, dgrad and wgrad of every V3 FP8 Linear are accepted by torch's checks (meta tensors:
    shapes and strides only, no memory). Fails on the code the H100 run measured (dgrad scale_b view)."""
    x = torch.empty(SMALL_M, k, device="meta", requires_grad=True)
    w = nn.Parameter(torch.empty(n, k, device="meta"))
    y = fp8_linear(x, w)
    y.backward(torch.empty(SMALL_M, n, device="meta"))
    recipes = [(c[0], c[1]) for c in fake_scaled_mm.calls]
    assert recipes == [
        (ScalingType.BlockWise1x128, ScalingType.BlockWise128x128),  # forward: X 1x128, W 128x128
        (ScalingType.BlockWise1x128, ScalingType.BlockWise128x128),  # dgrad: dY 1x128, W^T 128x128
        (ScalingType.BlockWise1x128, ScalingType.BlockWise1x128),  # wgrad: dY^T, X^T 1x128 along tokens
    ], recipes
    (_, _, m0, n0, k0), (_, _, m1, n1, k1), (_, _, m2, n2, k2) = fake_scaled_mm.calls
    assert (m0, k0) == (SMALL_M, k) and n0 >= n  # forward: [M, K] x [K, N]
    assert (m1, k1) == (SMALL_M, _up(n, 128)) and n1 >= k  # dgrad: [M, N] x [N, K]
    assert m2 >= n and n2 >= k and k2 == 128  # wgrad: [N, tokens] x [tokens, K]
    assert x.grad is not None and w.grad is not None and w.grad.shape == (n, k)


def _up(a: int, b: int) -> int:
    return -(-a // b) * b


def _blocky(shape: tuple[int, int], block: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Gaussian data whose groups differ in magnitude by 10^±1, so a scale applied to the wrong
    group is off by up to 100x instead of a few percent."""
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    mags = 10.0 ** (torch.rand(grid, generator=g) * 2 - 1)
    mags = mags.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]
    return torch.randn(shape, generator=g) * mags


def _hat(t: torch.Tensor) -> torch.Tensor:
    """An upper bound of |dequant(quant(t))| elementwise: e4m3 rounds by at most 2^-4 relative for
    normals and 2^-10 * scale for subnormals (scale <= max|t| / 448), see quant.e4m3_error_bound.
    (float32: the bound's own rounding, ~K u relative, is inside the 1 % slack below.)"""
    a = t.abs().float()
    return a * (1 + 2.0**-4) + float(a.max()) * 2.0**-10 / 448


def _assert_within_fp32_gemm_bound(got: torch.Tensor, ref: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor, k: int):
    """|fast - reference| <= (K + 3) u sum_k |a_k| |b_k|: the reference dequantizes (1 rounding), multiplies
    (1) and sums K terms in float32 in some order (<= (K - 1) u, first order, Higham Thm 3.1); the fake
    sums exactly in float64 and rounds once to float32. Everything else (a wrong scale layout) is far
    larger on the blocky data."""
    bound = (k + 3) * U32 * (a_hat.float() @ b_hat.float().T) * 1.01
    err = (got.double() - ref.double()).abs()
    worst = float((err / bound.clamp_min(1e-300)).max())
    assert bool((err <= bound).all()), f"max err/bound {worst:.3g}"


# The numbers are checked on the six weights up to 40M elements. The three largest (o_proj and the dense
# MLP, 117-132M elements, 15-30 s each on 2 cores) add no layout case: every one of their dimensions is
# a whole number of 128-blocks, as in q_a/q_b/expert shapes here, and the partial block is kv_a's. Their
# contract (shapes, strides, dtypes of all three GEMMs) is checked by the meta-tensor test above.
_NUMERIC_SHAPES = [pytest.param(*s, id=i, marks=[pytest.mark.slow] if s[1] * s[2] > 20e6 else [])
                   for s, i in zip(V3_SHAPES, SHAPE_IDS) if s[1] * s[2] <= 40e6]


@pytest.mark.parametrize("name, n, k", _NUMERIC_SHAPES)
def test_fast_path_numbers_equal_the_reference_on_v3_shapes(monkeypatch, name, n, k):
    """Real CPU tensors: y, dx and dW through the contract-checking fake equal the fp32 reference path
    within the float32 summation bound, on data whose tiles and blocks differ in magnitude."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x = _blocky((SMALL_M, k), (1, 128), g)
    w = _blocky((n, k), (128, 128), g) / math.sqrt(k)
    gy = _blocky((SMALL_M, n), (1, 128), g)

    def run(fast: bool):
        if fast:
            monkeypatch.setattr(F, "scaled_mm", FakeScaledMM())
            monkeypatch.setattr(gemm, "_fast_path_available", lambda device: True)
        else:
            monkeypatch.setattr(gemm, "_fast_path_available", lambda device: False)
        xx = x.clone().requires_grad_(True)
        ww = nn.Parameter(w.clone())
        y = fp8_linear(xx, ww)
        y.backward(gy)
        return y.detach(), xx.grad, ww.grad

    y_ref, dx_ref, dw_ref = run(False)
    y, dx, dw = run(True)
    assert len(F.scaled_mm.calls) == 3
    _assert_within_fp32_gemm_bound(y, y_ref, _hat(x), _hat(w), k)
    _assert_within_fp32_gemm_bound(dx, dx_ref, _hat(gy), _hat(w.T), n)
    _assert_within_fp32_gemm_bound(dw, dw_ref, _hat(gy.T), _hat(_hat(x).T), SMALL_M)
    # and the reference itself is the quantized product, not something else
    assert float((y_ref - x @ w.T).norm() / (x @ w.T).norm()) < 0.1


def test_probe_runs_all_three_orientations_and_rejects_a_broken_one(monkeypatch):
    """The start-up probe goes through forward (X, W), dgrad (dY, W^T as the transposed view the
    backward passes) and wgrad (1x128 x 1x128) and disables the fast path when one of them fails."""
    fake = FakeScaledMM()
    monkeypatch.setattr(F, "scaled_mm", fake)
    assert gemm._probe(torch.device("cpu")) is True
    recipes = {(c[0], c[1]) for c in fake.calls}
    assert recipes == {(ScalingType.BlockWise1x128, ScalingType.BlockWise128x128), (ScalingType.BlockWise1x128, ScalingType.BlockWise1x128)}
    orientations = set(gemm.PROBE_ORIENTATIONS)
    assert orientations == {"forward", "dgrad", "wgrad"}
    # a probe call per orientation and shape, each one accepted by the contract
    assert len(fake.calls) >= 3 * len(gemm.PROBE_SHAPES)

    m, k, n = gemm.PROBE_SHAPES[-1]

    def reject_transposed_weight(mat_a, mat_b, scale_a, scale_recipe_a, scale_b, scale_recipe_b, **kw):
        # the dgrad GEMM of the last probe shape: [M, N] x [N, K] with the weight's 128x128 blocks
        if scale_recipe_b == ScalingType.BlockWise128x128 and tuple(mat_b.shape) == (n, k):
            raise ContractViolation("rejected on purpose")
        return fake(mat_a, mat_b, scale_a, scale_recipe_a, scale_b, scale_recipe_b, **kw)

    monkeypatch.setattr(F, "scaled_mm", reject_transposed_weight)
    assert gemm._probe(torch.device("cpu")) is False

    def wrong_numbers(*args, **kw):
        return fake(*args, **kw) * 1.01

    monkeypatch.setattr(F, "scaled_mm", wrong_numbers)
    assert gemm._probe(torch.device("cpu")) is False


def test_transposed_and_strided_operand_views_are_made_contiguous(fake_scaled_mm):
    """Whatever view it is given (a transposed weight, one expert of a stack, a transposed activation),
    scaled_mm_gemm_nt hands torch row-major A, column-major B and scales in torch's layout, and the
    numbers equal the reference."""
    g = torch.Generator().manual_seed(3)
    stack = torch.stack([_blocky((512, 256), (128, 128), g) for _ in range(2)])  # [E, N=512, K=256]
    wq = BlockQuantized.quantize(stack, (128, 128))
    x = _blocky((40, 256), (1, 128), g)
    gy = _blocky((40, 512), (1, 128), g)
    cases = [
        (BlockQuantized.quantize(x, (1, 128)), wq[1]),  # forward on one expert of a stack
        # dgrad: W^T as a transposed view whose 4 K-blocks need no padding (the H100 failure)
        (BlockQuantized.quantize(gy, (1, 128)), wq[0].t()),
        # wgrad-like: both operands 1x128 along a transposed (token) dim, handed over as views
        (BlockQuantized.quantize(gy.T.contiguous(), (1, 128)), BlockQuantized.quantize(x.T.contiguous(), (1, 128))),
        (BlockQuantized.quantize(x, (1, 128)).t().t(), BlockQuantized.quantize(stack[0].T.contiguous(), (128, 128)).t()),
    ]
    for a, b in cases:
        got = gemm.scaled_mm_gemm_nt(a, b)
        ref = gemm.reference_gemm_nt(a, b)
        _assert_within_fp32_gemm_bound(got, ref, a.dequantize().abs(), b.dequantize().abs(), a.data.shape[1])
    assert len(fake_scaled_mm.calls) == len(cases)


def _count_fp8_pads(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the fp8 operands scaled_mm_operands copies into padded buffers, appended as it does."""
    padded = []
    real_pad2d = gemm._pad2d

    def counting_pad2d(t, rows, cols, value=0.0):
        out = real_pad2d(t, rows, cols, value)
        if out is not t and t.dtype == torch.float8_e4m3fn:
            padded.append(tuple(t.shape))
        return out

    monkeypatch.setattr(gemm, "_pad2d", counting_pad2d)
    return padded


@pytest.mark.parametrize("tokens, copies", [(256, 0), (250, 4)])
def test_rows_aligned_to_the_fp8_tile_make_the_three_gemms_copy_nothing(fake_scaled_mm, monkeypatch, tokens, copies):
    """Why `fp8: true` pads packed rows to a multiple of 128 tokens on CUDA (posttrain.fp8.training.fp8_row_multiple):
    with 256 tokens no operand of the forward, dgrad or wgrad GEMM is copied into a padded buffer; with 250
    the forward's X, the dgrad's dY and both wgrad operands (which contract over tokens) are."""
    from posttrain.fp8.training import fp8_row_multiple

    assert fp8_row_multiple("cuda") == gemm.TILE and fp8_row_multiple("cpu") is None
    padded = _count_fp8_pads(monkeypatch)
    x = torch.randn(tokens, 256, requires_grad=True)
    w = nn.Parameter(torch.randn(384, 256))
    fp8_linear(x, w).backward(torch.randn(tokens, 384))
    assert len(fake_scaled_mm.calls) == 3
    assert len(padded) == copies, padded


def test_column_major_activation_scales_reach_scaled_mm_without_a_copy(fake_scaled_mm):
    """The Triton quantizer writes a matrix's 1x128 scales column-major (tests/test_fp8_triton_quant.py):
    scaled_mm_operands then hands them over as they are, where a row-major grid is copied at every GEMM."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(384, 256, generator=g)
    xq, wq = BlockQuantized.quantize(x, (1, 128)), BlockQuantized.quantize(w, (128, 128))
    col_major = BlockQuantized(xq.data, xq.scale_inv.t().contiguous().t(), (1, 128))
    assert gemm.scaled_mm_operands(col_major, wq)["scale_a"].data_ptr() == col_major.scale_inv.data_ptr()
    assert gemm.scaled_mm_operands(xq, wq)["scale_a"].data_ptr() != xq.scale_inv.data_ptr()  # row-major: a copy
    assert torch.equal(gemm.scaled_mm_gemm_nt(col_major, wq), gemm.scaled_mm_gemm_nt(xq, wq))


def test_a_cached_weight_is_put_in_scaled_mm_s_layout_once_per_step(fake_scaled_mm, monkeypatch):
    """kv_a's 576 rows are not a multiple of 128. Its FP8 weight is padded into F.scaled_mm's layout (and, for the
    dgrad, transposed) when the step's FP8 weight is built, not at every GEMM: a second forward+backward in the
    same optimizer step copies only dY, whose 320 channels the dgrad contracts over."""
    padded = _count_fp8_pads(monkeypatch)
    g = torch.Generator().manual_seed(1)
    x, w, gy = torch.randn(256, 256, generator=g), torch.randn(320, 256, generator=g), torch.randn(256, 320, generator=g)
    weight = nn.Parameter(w.clone())
    grads = []
    for _ in range(2):
        padded.clear()
        xx = x.clone().requires_grad_(True)
        weight.grad = None
        fp8_linear(xx, weight).backward(gy)
        grads.append((xx.grad, weight.grad))
    assert padded == [(256, 320)], padded  # dY, in the dgrad
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    monkeypatch.setattr(gemm, "_fast_path_available", lambda device: False)  # and it is the reference's product
    xr = x.clone().requires_grad_(True)
    weight.grad = None
    fp8_linear(xr, weight).backward(gy)
    _assert_within_fp32_gemm_bound(grads[0][0], xr.grad, _hat(gy), _hat(w.T), 320)
