"""FP8 routed experts through torch's grouped FP8 GEMM (``F.scaled_grouped_mm``, row-wise scales).

That kernel exists only on CUDA (SM90/SM100). Here it is replaced by the contract-checking CPU stand-in
of tests/fp8_torch_contract.py (torch's GroupedBlas.cpp checks: row-major mat_a, "transposed" mat_b,
scale shapes, int32 offsets, bf16 output), the dispatch is forced on, and the results are compared with
an independent per-expert emulation of the row-wise recipe.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8_torch_contract import FakeScaledGroupedMM
from posttrain.fp8 import experts
from posttrain.fp8.experts import fp8_grouped_linear, grouped_backend
from posttrain.fp8.linear import FP8Recipe


def _fq_rows(t: torch.Tensor) -> torch.Tensor:
    """Independent row-wise e4m3 fake quantization over the last dim (no posttrain code)."""
    amax = t.float().abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    return (t.float() / s).to(torch.float8_e4m3fn).float() * s


@pytest.fixture
def grouped_fake(monkeypatch):
    fake = FakeScaledGroupedMM()
    monkeypatch.setattr(F, "scaled_grouped_mm", fake)
    monkeypatch.setattr(experts, "_grouped_fast_path_available", lambda device: True)
    return fake


def _problem(seed: int = 0, counts=(5, 0, 140, 3, 33), k: int = 256, n: int = 384):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g) * 10.0 ** (torch.rand(sum(counts), 1, generator=g) * 2 - 1)
    w = torch.randn(len(counts), n, k, generator=g) * 0.05
    gy = torch.randn(sum(counts), n, generator=g)
    return list(counts), x, w, gy


def test_grouped_rowwise_path_meets_the_contract_and_equals_its_emulation(grouped_fake):
    """Forward and dgrad go through one grouped call each, with operands torch accepts; y, dx and dW
    equal the row-wise recipe computed per expert: y = Q_row(x) Q_row(W_e)^T, dx = Q_row(dy) Q_col(W_e),
    dW_e = bf16(dy_e)^T bf16(dequant(Q_row(x_e))) (bf16 wgrad from the FP8 activation cache)."""
    counts, x, w, gy = _problem()
    xr = x.clone().requires_grad_(True)
    wp = nn.Parameter(w.clone())
    assert grouped_backend("cpu", FP8Recipe()) == "rowwise"
    y = fp8_grouped_linear(xr, wp, counts, FP8Recipe())
    y.backward(gy)
    assert [c[0] for c in grouped_fake.calls] == ["rowwise", "rowwise"]  # forward, dgrad
    ends = tuple(torch.tensor(counts).cumsum(0).tolist())
    assert all(c[1] == ends for c in grouped_fake.calls)

    y_ref = torch.zeros(sum(counts), w.shape[1])
    dx_ref = torch.zeros_like(x)
    dw_ref = torch.zeros_like(w)
    xq, gq = _fq_rows(x), _fq_rows(gy.to(torch.bfloat16))
    start = 0
    for e, c in enumerate(counts):
        sl = slice(start, start + c)
        y_ref[sl] = xq[sl] @ _fq_rows(w[e]).T
        dx_ref[sl] = gq[sl] @ _fq_rows(w[e].T).T
        dw_ref[e] = gy[sl].to(torch.bfloat16).float().T @ xq[sl].to(torch.bfloat16).float()
        start += c
    # the grouped kernel writes bf16: one rounding (2^-9 relative) on top of float32-exact products
    torch.testing.assert_close(y.detach(), y_ref, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(xr.grad, dx_ref, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(wp.grad, dw_ref, rtol=2**-7, atol=1e-4)
    assert float(wp.grad[1].abs().sum()) == 0.0  # the expert without tokens
    # and it is FP8 close to the exact product (row-wise scales: coarser than 1x128 tiles)
    exact = torch.cat([x[sum(counts[:e]) : sum(counts[: e + 1])] @ w[e].T for e in range(len(counts))])
    rel = float((y.detach() - exact).norm() / exact.norm())
    assert 1e-3 < rel < 0.08, rel


def test_bf16_backward_recipe_and_blockwise_fallbacks(grouped_fake):
    counts, x, w, gy = _problem(seed=1)
    xr = x.clone().requires_grad_(True)
    wp = nn.Parameter(w.clone())
    y = fp8_grouped_linear(xr, wp, counts, FP8Recipe(backward="bf16"))
    y.backward(gy)
    assert len(grouped_fake.calls) == 1  # FP8 forward only; the backward is bf16 grouped_mm
    dx_ref = torch.cat([gy[sum(counts[:e]) : sum(counts[: e + 1])].to(torch.bfloat16).float()
                        @ w[e].to(torch.bfloat16).float() for e in range(len(counts))])
    torch.testing.assert_close(xr.grad, dx_ref, rtol=2**-7, atol=1e-4)

    # the recipe can pin the report's block-scaled per-expert GEMMs, and shapes the kernel cannot take
    # (N or K not a multiple of 16) fall back to them too
    grouped_fake.calls.clear()
    fp8_grouped_linear(x, nn.Parameter(w.clone()), counts, FP8Recipe(grouped="blockwise")).sum().backward()
    fp8_grouped_linear(x[:, :250], nn.Parameter(w[:, :, :250].clone()), counts).sum().backward()
    assert grouped_fake.calls == []
    assert grouped_backend("cpu", FP8Recipe(grouped="blockwise")) == "blockwise"


def test_dispatch_without_the_kernel_stays_on_the_blockwise_reference(monkeypatch):
    """On CPU (and on CUDA without F.scaled_grouped_mm or before SM90) the dispatch never picks the
    grouped kernel, whatever the recipe says."""
    assert grouped_backend("cpu") == "blockwise"
    monkeypatch.setenv(experts.GROUPED_ENV, "rowwise")
    assert grouped_backend("cpu") == "blockwise"
    monkeypatch.delattr(F, "scaled_grouped_mm")
    assert experts._grouped_fast_path_available(torch.device("cuda")) is False


def test_grouped_probe_accepts_the_contract_and_rejects_wrong_numbers(monkeypatch, caplog):
    fake = FakeScaledGroupedMM()
    monkeypatch.setattr(F, "scaled_grouped_mm", fake)
    assert experts._probe_grouped(torch.device("cpu")) is True
    assert len(fake.calls) == 2  # the forward ([E, N, K]) and the dgrad ([E, K, N]) operand layouts

    def off_by_a_percent(*args, **kw):
        return (fake(*args, **kw).float() * 1.02).to(torch.bfloat16)

    monkeypatch.setattr(F, "scaled_grouped_mm", off_by_a_percent)
    with caplog.at_level(logging.WARNING, logger="posttrain.fp8.experts"):
        assert experts._probe_grouped(torch.device("cpu")) is False
    assert "disagrees" in caplog.text


def test_transformers_experts_module_runs_on_the_grouped_path(grouped_fake):
    """The registered "posttrain_fp8" experts implementation reaches the grouped kernel end to end."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    from posttrain.fp8.experts import enable_fp8_experts

    cfg = DeepseekV3Config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=1, topk_group=1)
    torch.manual_seed(0)
    holder = nn.Module()
    holder.experts = DeepseekV3Experts(cfg)
    nn.init.normal_(holder.experts.gate_up_proj, std=0.05)
    nn.init.normal_(holder.experts.down_proj, std=0.05)
    assert enable_fp8_experts(holder) == ["experts"]
    hidden = torch.randn(12, 256, requires_grad=True)
    top_w, top_i = torch.sigmoid(torch.randn(12, 8)).topk(2, dim=-1)
    out = holder.experts(hidden, top_i, top_w)
    out.square().sum().backward()
    assert len(grouped_fake.calls) == 4  # two projections, forward and dgrad each
    assert float(holder.experts.down_proj.grad.abs().sum()) > 0 and hidden.grad is not None
