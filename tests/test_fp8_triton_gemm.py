"""posttrain/fp8/triton_gemm.py: the Triton block-scaled FP8 GEMM, and POSTTRAIN_FP8_GEMM=triton.

* The forward, dgrad and wgrad products of an FP8 Linear (1x128 x 128x128, 1x128 x W^T's blocks, 1x128 x 1x128)
  are within the float32 bound of the reference, on shapes with partial tiles and blocks, thin (576 columns) and
  wide (two column tiles of 128), with B as the quantized view and as the operand a weight keeps for the step,
  on data whose groups differ in magnitude by 10^±1 (a scale read for the wrong group is far off).
* A bf16 output is the float32 result rounded to nearest even, bit for bit.
* With ``POSTTRAIN_FP8_GEMM=triton`` an FP8 Linear's three GEMMs go through the kernel and give the reference
  path's output and gradients; a kernel that fails its start-up probe is not used (one warning).
* The kernel compiles for an H100 with FP8 wgmma and an asynchronous copy pipeline.

The kernel runs under Triton's CPU interpreter in a fresh process (``python tests/test_fp8_triton_gemm.py`` with
``TRITON_INTERPRET=1``, one JSON line); on CUDA the same cases run compiled (``-m gpu``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import pytest
import torch
from subprocess_env import run_in_triton_interpreter  # noqa: E402
from torch import nn

from posttrain.fp8 import gemm, triton_gemm
from posttrain.fp8.gemm import BlockQuantized, prepare_b, reference_gemm_nt

U32 = 2.0**-24  # unit roundoff of float32
SHAPES = [(200, 300, 320), (64, 640, 576), (130, 384, 1100)]  # (tokens M, in K, out N)


def _blocky(shape: tuple[int, int], block: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    mags = 10.0 ** (torch.rand(grid, generator=g) * 2 - 1)
    mags = mags.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]
    return torch.randn(shape, generator=g) * mags


def _err_over_bound(got: torch.Tensor, a: BlockQuantized, b: BlockQuantized) -> float:
    """max |got - reference| / bound. Both sum the same exact fp8 products in float32: the reference dequantizes
    (1 rounding each), multiplies (1) and adds K terms (K - 1); the kernel adds each 128-block's products (127),
    scales twice (2) and adds the blocks (K/128). Each is within (K + 3) u Σ|a||b| of the exact sum (first order,
    Higham Thm 3.1), so they differ by at most twice that."""
    ref = reference_gemm_nt(a, b).double()
    k = a.data.shape[1]
    mag = a.dequantize(torch.float64).abs() @ b.dequantize(torch.float64).abs().transpose(-2, -1)
    bound = 2 * (k + 3) * U32 * mag
    return float(((got.double() - ref).abs() / bound.clamp_min(1e-300)).max())


def _gemm_cases(device: str) -> dict:
    out = {}
    g = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES:
        x = _blocky((m, k), (1, 128), g).to(device)
        w = (_blocky((n, k), (128, 128), g) / math.sqrt(k)).to(device)
        gy = _blocky((m, n), (1, 128), g).to(device)
        wq = BlockQuantized.quantize(w, (128, 128))
        orientations = {
            "forward": (BlockQuantized.quantize(x, (1, 128)), wq),
            "dgrad": (BlockQuantized.quantize(gy, (1, 128)), wq.t()),  # W^T as the transposed view of W's blocks
            "wgrad": (BlockQuantized.quantize(gy.t(), (1, 128)), BlockQuantized.quantize(x.t(), (1, 128))),
        }
        for name, (a, b) in orientations.items():
            ref = reference_gemm_nt(a, b)
            for form, operand in (("view", b), ("prepared", prepare_b(b))):
                got = triton_gemm.gemm_nt(a, operand)
                out[f"{name} {m}x{k}x{n} {form}"] = r = {
                    "err/bound": _err_over_bound(got, a, b), "rel err": float((got - ref).norm() / ref.norm())}
                if form == "prepared":  # the form the step's weights take
                    got_bf16 = triton_gemm.gemm_nt(a, operand, torch.bfloat16)
                    r["bf16 is the fp32 result rounded"] = torch.equal(got.to(torch.bfloat16), got_bf16)
    return out


def _linear_case(device: str) -> dict:
    """An FP8 Linear forward+backward with the Triton GEMMs against the reference GEMMs: the same quantized
    operands, so the same products up to float32 summation order."""
    g = torch.Generator().manual_seed(1)
    x = _blocky((200, 300), (1, 128), g).to(device)
    w = (_blocky((320, 300), (128, 128), g) / math.sqrt(300)).to(device)
    gy = _blocky((200, 320), (1, 128), g).to(device)
    from posttrain.fp8.linear import FP8Linear, FP8Recipe

    calls = []
    kernel = triton_gemm.gemm_nt

    def counted(*args, **kw):
        calls.append(1)
        return kernel(*args, **kw)

    results = {}
    for backend in ("reference", "triton"):
        os.environ[gemm.GEMM_BACKEND_ENV] = backend
        results[f"{backend} backend"] = gemm.active_backend(device)  # the start-up probe runs here, uncounted
        triton_gemm.gemm_nt = counted
        try:
            layer = FP8Linear.from_linear(nn.Linear(300, 320, bias=False, device=device), FP8Recipe())
            with torch.no_grad():
                layer.weight.copy_(w)
            xi = x.clone().requires_grad_(True)
            layer(xi).backward(gy)
            results[backend] = (layer(xi.detach()).detach(), xi.grad, layer.weight.grad)
        finally:
            triton_gemm.gemm_nt = kernel
            os.environ.pop(gemm.GEMM_BACKEND_ENV)
    ref, ours = results["reference"], results["triton"]
    return {"backends": [results["reference backend"], results["triton backend"]], "kernel calls": len(calls),
            "rel err y, dx, dW": [float((o - r).norm() / r.norm()) for o, r in zip(ours, ref)]}


def run_cases(device: str) -> dict:
    gemm._fast_state.clear()
    return {"gemm": _gemm_cases(device), "linear": _linear_case(device)}


def _assert_cases(results: dict, fp32_tensor_cores: bool) -> None:
    rounded = [r["bf16 is the fp32 result rounded"] for r in results["gemm"].values() if "bf16 is the fp32 result rounded" in r]
    assert len(rounded) == 3 * len(SHAPES) and all(rounded), results["gemm"]  # each orientation's prepared form
    for name, r in results["gemm"].items():
        if fp32_tensor_cores:  # the interpreter sums the block's products in float32
            assert r["err/bound"] <= 1.0, (name, r)
        else:  # Hopper's FP8 tensor cores keep about 14 bits of a block's sum (report §3.3.2): the probe's 1e-3
            assert r["rel err"] < 1e-3, (name, r)
    lin = results["linear"]
    assert lin["backends"] == ["reference", "triton"], lin
    assert lin["kernel calls"] == 3 + 1, lin  # forward, dgrad, wgrad; and the second forward
    assert max(lin["rel err y, dx, dW"]) < (1e-5 if fp32_tensor_cores else 1e-3), lin


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_in_triton_interpreter(__file__)


def test_the_three_gemms_are_within_the_fp32_bound_and_an_fp8_linear_takes_them_in_the_interpreter(interpreted):
    """Forward, dgrad and wgrad products within twice the float32 summation bound of the reference (partial tiles,
    576 and 1100 columns, views and prepared operands, groups 10^±1 apart); bf16 output rounded once; an FP8
    Linear with POSTTRAIN_FP8_GEMM=triton runs its three GEMMs through the kernel and equals the reference path."""
    _assert_cases(interpreted, fp32_tensor_cores=True)


@pytest.mark.gpu
def test_the_three_gemms_on_cuda():
    _assert_cases(run_cases("cuda"), fp32_tensor_cores=False)


def test_a_kernel_that_fails_its_probe_is_not_used(monkeypatch, caplog):
    """POSTTRAIN_FP8_GEMM=triton with a kernel whose numbers are 1% off: the probe rejects it once, with a warning,
    and the GEMMs take the next backend (on a CPU, the reference)."""
    calls = []

    def wrong(a, b, out_dtype=torch.float32):
        calls.append(1)
        return reference_gemm_nt(a, b.source if isinstance(b, gemm.ScaledMMOperandB) else b, out_dtype) * 1.01

    monkeypatch.setattr(triton_gemm, "available", lambda device: True)
    monkeypatch.setattr(triton_gemm, "gemm_nt", wrong)
    monkeypatch.setenv(gemm.GEMM_BACKEND_ENV, "triton")
    monkeypatch.setattr(gemm, "_fast_state", {})
    with caplog.at_level(logging.WARNING, logger="posttrain.fp8.gemm"):
        assert gemm.active_backend("cpu") == "reference"
        assert gemm.active_backend("cpu") == "reference"
    assert len(calls) == 1 and len([r for r in caplog.records if "Triton" in r.getMessage()]) == 1
    monkeypatch.setenv(gemm.GEMM_BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="POSTTRAIN_FP8_GEMM must be one of"):
        gemm.active_backend("cpu")


def test_the_kernel_compiles_for_the_h100_with_fp8_wgmma_and_a_copy_pipeline():
    """sm_90 PTX (tests/triton_ptx.py) for both kinds of B scales and both tile widths: FP8 (e4m3) wgmma,
    cp.async loads of the K-major operands (unit K strides, as the quantizers and prepared weights give them),
    vector stores of the output."""
    import re

    if triton_gemm.triton is None:
        pytest.skip("Triton is not installed")
    from triton_ptx import h100_ptx

    for rows_per_scale, out, block_n in ((128, "bf16", 64), (128, "bf16", 128), (1, "fp32", 128)):
        ptx = h100_ptx(triton_gemm._block_scaled_gemm_kernel, {"a_ptr": "fp8", "b_ptr": "fp8", "c_ptr": out},
                       dict(B_ROWS_PER_SCALE=rows_per_scale, ROUND_BF16=out == "bf16", BLOCK_M=64, BLOCK_N=block_n,
                            GROUP_M=8, stride_ak=1, stride_bk=1, stride_cn=1))
        case = (rows_per_scale, out, block_n)
        assert re.search(r"wgmma\.mma_async\S*e4m3\.e4m3", ptx), case
        assert "cp.async" in ptx and not re.search(r"ld\.global\S*\.b8", ptx), case
        assert re.search(r"st\.global(\.\w+)*\.v4", ptx), case


def test_tiles_follow_the_shape():
    """64-column tiles for thin outputs (kv_a's 576: 9 tiles, not 4.5 of 128), 128 otherwise; a deeper pipeline
    for long contractions."""
    assert triton_gemm.tile_config(4096, 576, 7168)["BLOCK_N"] == 64
    assert triton_gemm.tile_config(4096, 32768, 512)["BLOCK_N"] == 128
    assert triton_gemm.tile_config(4096, 576, 7168)["num_stages"] > triton_gemm.tile_config(4096, 32768, 512)["num_stages"]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the tests in this file do)")
    print(json.dumps(run_cases("cpu")))
