"""FP8 training layers (posttrain.fp8.linear / experts / optim / gemm) on CPU (reference GEMM path)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from posttrain.fp8.experts import EXPERTS_IMPLEMENTATION, fp8_grouped_linear
from posttrain.fp8.gemm import active_backend
from posttrain.fp8.linear import FP8Linear, FP8Recipe, fp8_linear, swap_linears_to_fp8
from posttrain.fp8.optim import AdamWLowPrecisionMoments


def _fake_quant(x: torch.Tensor, gr: int, gc: int) -> torch.Tensor:
    """Independent e4m3 fake-quantization of a 2-D tensor in gr x gc groups (loops, no posttrain code)."""
    out = torch.empty_like(x, dtype=torch.float32)
    for i in range(0, x.shape[0], gr):
        for j in range(0, x.shape[1], gc):
            blk = x[i : i + gr, j : j + gc].float()
            amax = float(blk.abs().max())
            s = amax / 448.0 if amax > 0 else 1.0
            out[i : i + gr, j : j + gc] = (blk / s).to(torch.float8_e4m3fn).float() * s
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _inputs(tokens: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # per-token magnitudes spread over 10^±2: a wrong tile orientation mixes them and fails the exact checks
    x = torch.randn(tokens, k, generator=g) * 10.0 ** (torch.rand(tokens, 1, generator=g) * 4 - 2)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    gy = torch.randn(tokens, n, generator=g) * 10.0 ** (torch.rand(tokens, 1, generator=g) * 4 - 2)
    return x, w, gy


def test_cpu_uses_reference_gemm(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_FP8_GEMM", "scaled_mm")
    assert active_backend("cpu") == "reference"


@pytest.mark.parametrize("tokens, k, n", [(200, 300, 130), (256, 256, 384)])
def test_fp8_linear_matches_the_report_recipe_exactly(tokens, k, n):
    """Forward 1x128 x 128x128, dgrad 1x128 (along N) x 128x128, wgrad 128x1 x 128x1 (along tokens)."""
    x, w, gy = _inputs(tokens, k, n)
    x = x.requires_grad_(True)
    weight = nn.Parameter(w.clone())
    y = fp8_linear(x, weight)
    y.backward(gy)
    y_ref = _fake_quant(x.detach(), 1, 128) @ _fake_quant(w, 128, 128).T
    dx_ref = _fake_quant(gy, 1, 128) @ _fake_quant(w, 128, 128)
    x_fp8 = _fake_quant(x.detach(), 1, 128)  # wgrad reads the FP8 activation cache, re-tiled 128x1
    dw_ref = _fake_quant(gy, 128, 1).T @ _fake_quant(x_fp8, 128, 1)
    assert _rel(y, y_ref) < 1e-5
    assert _rel(x.grad, dx_ref) < 1e-5
    assert _rel(weight.grad, dw_ref) < 1e-5


def test_fp8_linear_close_to_high_precision_and_bf16_backward():
    """Stated bounds vs the fp32 layer: output and dgrad < 6 %, wgrad < 8 % relative Frobenius error
    (e4m3 rounds each operand by <= 6.25 %, ~2-3 % RMS)."""
    x, w, gy = _inputs(192, 300, 200, seed=1)
    ref = nn.Linear(300, 200, bias=True)
    with torch.no_grad():
        ref.weight.copy_(w)
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr)
    y_ref.backward(gy)
    for backward, gw_bound in (("fp8", 0.08), ("bf16", 1e-5)):
        layer = FP8Linear(300, 200, bias=True, recipe=FP8Recipe(backward=backward))
        layer.load_state_dict(ref.state_dict())
        xf = x.clone().requires_grad_(True)
        y = layer(xf)
        y.backward(gy)
        assert 1e-3 < _rel(y, y_ref) < 0.06  # really quantized, and close
        assert _rel(xf.grad, xr.grad) < (0.06 if backward == "fp8" else 1e-5)
        assert _rel(layer.weight.grad, ref.weight.grad) < gw_bound
        assert torch.allclose(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
        assert layer.weight.grad.dtype == torch.float32 and float(layer.weight.grad.abs().sum()) > 0


def test_fp8_linear_bf16_activations_keep_fp32_master_grads():
    layer = FP8Linear(256, 128, bias=False)
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 128)
    y.float().square().mean().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32



def test_fp8_linear_caches_only_x_transposed_in_fp8_and_no_activation_for_a_frozen_weight():
    """The forward keeps X^T in 128x1 FP8 tiles for the wgrad (1 byte per element, §3.3.3), not X itself, and
    keeps no activation at all when the weight gets no gradient; the gradients are those of the recipe."""
    x, w, gy = _inputs(200, 300, 130)

    def saved_by_forward(weight: nn.Parameter, x_in: torch.Tensor) -> tuple[list, torch.Tensor]:
        saved = []

        def pack(t):
            saved.append(("weight" if t is weight else t.dtype, tuple(t.shape)))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fp8_linear(x_in, weight)
        return saved, y

    weight = nn.Parameter(w.clone())
    saved, y = saved_by_forward(weight, x.clone().requires_grad_(True))
    assert sorted(map(str, saved)) == sorted(map(str, [
        ("weight", (130, 300)), (torch.float8_e4m3fn, (300, 200)), (torch.float32, (300, 2))]))
    y.backward(gy)
    x_fp8 = _fake_quant(x, 1, 128)
    assert _rel(weight.grad, _fake_quant(gy, 128, 1).T @ _fake_quant(x_fp8, 128, 1)) < 1e-5

    frozen = nn.Parameter(w.clone(), requires_grad=False)
    xr = x.clone().requires_grad_(True)
    saved, y = saved_by_forward(frozen, xr)
    assert saved == [("weight", (130, 300))]
    y.backward(gy)
    assert _rel(xr.grad, _fake_quant(gy, 1, 128) @ _fake_quant(w, 128, 128)) < 1e-5

def test_fp8_training_loop_with_bf16_moments_decreases_loss():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 130))
    student = nn.Sequential(FP8Linear(256, 256), nn.SiLU(), FP8Linear(256, 130))
    opt = AdamWLowPrecisionMoments(student.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.randn(512, 256)
    with torch.no_grad():
        target = teacher(data)
    losses = []
    for step in range(40):
        idx = torch.randint(0, 512, (64,))
        loss = nn.functional.mse_loss(student(data[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses[::10]
    state = opt.state[student[0].weight]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    assert student[0].weight.dtype == torch.float32


def test_low_precision_adamw_equals_torch_adamw_with_fp32_moments():
    torch.manual_seed(0)
    p1 = nn.Parameter(torch.randn(64, 32))
    p2 = nn.Parameter(p1.detach().clone())
    ours = AdamWLowPrecisionMoments([p1], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, moment_dtype=torch.float32)
    ref = torch.optim.AdamW([p2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(64, 32)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_fp8_grouped_linear_matches_per_expert_fp8_linear():
    g = torch.Generator().manual_seed(2)
    counts = [5, 0, 140, 3]  # an expert without tokens, one with more than a 128-token tile
    x = torch.randn(sum(counts), 300, generator=g, requires_grad=True)
    w = nn.Parameter(torch.randn(4, 130, 300, generator=g) * 0.05)
    y = fp8_grouped_linear(x, w, counts)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    ys, dxs, dws, start = [], [], [], 0
    for e, n in enumerate(counts):
        xe = x.detach()[start : start + n].clone().requires_grad_(True)
        we = nn.Parameter(w.detach()[e].clone())
        if n:
            ye = fp8_linear(xe, we)
            ye.backward(gy[start : start + n])
            ys.append(ye.detach())
            dxs.append(xe.grad)
        dws.append(we.grad if we.grad is not None else torch.zeros_like(we))
        start += n
    torch.testing.assert_close(y.detach(), torch.cat(ys), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, torch.cat(dxs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, torch.stack(dws), rtol=1e-5, atol=1e-5)
    assert float(w.grad[1].abs().sum()) == 0.0


def _tiny_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=128, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, n_shared_experts=1, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(cfg).float()


def test_swap_linears_and_experts_on_transformers_deepseek_v3():
    model = _tiny_v3()
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    experts = model.model.layers[1].mlp.experts
    hidden = torch.randn(12, 256)
    router_logits = torch.randn(12, 8)
    top_w, top_i = torch.sigmoid(router_logits).topk(2, dim=-1)
    with torch.no_grad():
        ref_out = experts(hidden, top_i, top_w)  # transformers' grouped_mm experts

    swapped = swap_linears_to_fp8(model)
    attn = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
    mlp = [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    shared = [f"model.layers.1.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(swapped) == sorted(attn + mlp + shared + ["model.layers.1.mlp.experts"])
    assert not isinstance(model.lm_head, FP8Linear)
    assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    # same Parameter objects and names: optimizers and checkpoints are unaffected
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())

    hidden_req = hidden.clone().requires_grad_(True)
    out = experts(hidden_req, top_i, top_w)
    assert 1e-3 < _rel(out, ref_out) < 0.10  # two chained FP8 GEMMs
    # exactly the per-token composition of FP8 linears, routing weights included
    want = torch.zeros_like(ref_out)
    with torch.no_grad():
        for t in range(hidden.shape[0]):
            for k in range(2):
                e = int(top_i[t, k])
                gate, up = fp8_linear(hidden[t : t + 1], experts.gate_up_proj[e]).chunk(2, dim=-1)
                want[t] += top_w[t, k] * fp8_linear(experts.act_fn(gate) * up, experts.down_proj[e])[0]
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-6)
    out.square().sum().backward()
    assert float(experts.gate_up_proj.grad.abs().sum()) > 0 and float(experts.down_proj.grad.abs().sum()) > 0

    ids = torch.randint(0, 128, (2, 16))
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    for name in ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.shared_experts.down_proj.weight"):
        assert float(model.get_parameter(name).grad.abs().sum()) > 0, name


def test_scaled_mm_operands_follow_torch_blockwise_contract(monkeypatch):
    """No GPU here: check the Hopper path's operand/scale layouts with a fake F.scaled_mm that enforces
    torch's checks (tests/fp8_torch_contract.py: A row-major [M,K] with 1x128 scales [M,K/128] strides
    (1,M); B column-major [K,N] with 128x128 scales [L4,N/128] strides (1,L4), or 1x128 scales [N,K/128]
    strides (1,N)) and computes the product in float64 from that layout.

    Tolerance, from the arithmetic rather than from one machine: the reference dequantizes to float32
    (one rounding per operand), multiplies (one) and sums K terms in float32 in whatever order the
    BLAS picks, so |fast - reference| <= (K + 3) u sum_k |a_k||b_k| (first order, u = 2^-24); the
    float64 fake adds one final rounding. (A fixed 1e-5 held on one CPU and failed on another: 4.6e-5.)"""
    import torch.nn.functional as F

    from fp8_torch_contract import FakeScaledMM
    from posttrain.fp8 import gemm
    from posttrain.fp8.gemm import BlockQuantized, reference_gemm_nt, scaled_mm_gemm_nt

    fake = FakeScaledMM()
    monkeypatch.setattr(F, "scaled_mm", fake)

    def check(a: BlockQuantized, b: BlockQuantized) -> None:
        got, ref = scaled_mm_gemm_nt(a, b), reference_gemm_nt(a, b)
        k = a.data.shape[1]
        bound = (k + 3) * 2.0**-24 * (a.dequantize().abs() @ b.dequantize().abs().T) * 1.01
        err = (got.double() - ref.double()).abs()
        assert bool((err <= bound).all()), float((err / bound).max())
        assert float((got - ref).abs().max()) > 0 or k < 2  # the fake really computed (not a copy of ref)

    x, w, gy = _inputs(200, 300, 330, seed=4)
    xq = BlockQuantized.quantize(x, (1, 128))
    for b in (BlockQuantized.quantize(w, (128, 128)), BlockQuantized.quantize(w, (1, 128))):
        check(xq, b)
    # dgrad operand: the transposed weight blocks (a view)
    wq = BlockQuantized.quantize(w, (128, 128))
    check(BlockQuantized.quantize(gy, (1, 128)), wq.t())
    assert len(fake.calls) == 3 and gemm.TILE == 128


def test_weight_is_quantized_once_per_optimizer_step(monkeypatch):
    """The FP8 weight is built once per optimizer step (report §3.3: weights are quantized for the GEMMs,
    the master stays high precision), not at every forward: a second forward (and the backward) reuse it;
    after an optimizer step -- fused AdamW included, which does not bump version counters -- or an
    in-place load the next forward re-quantizes and the output follows the new weight."""
    import gc
    import weakref

    import posttrain.fp8.linear as L

    calls: list[tuple] = []
    orig = L._quantize_weight_now

    def counting(weight, scale_fmt):
        calls.append(tuple(weight.shape))
        return orig(weight, scale_fmt)

    monkeypatch.setattr(L, "_quantize_weight_now", counting)
    x, w, gy = _inputs(64, 256, 130, seed=7)

    def fresh(layer):  # what the layer must compute: the same recipe with the cache off
        with monkeypatch.context() as m:
            m.setenv(L.WEIGHT_CACHE_ENV, "0")
            m.setattr(L, "_quantize_weight_now", orig)  # not counted
            return fp8_linear(x, layer.weight.detach().clone())

    for opt_cls, kw in ((torch.optim.AdamW, {"fused": True}), (torch.optim.SGD, {}), (AdamWLowPrecisionMoments, {})):
        calls.clear()
        layer = FP8Linear(256, 130, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        opt = opt_cls(layer.parameters(), lr=1e-2, **kw)
        y1 = layer(x)
        y2 = layer(x)
        (y1 * gy).sum().backward()
        assert len(calls) == 1, (opt_cls, calls)  # one quantization for two forwards and a backward
        assert torch.equal(y1, y2)
        opt.step()
        y3 = layer(x)
        assert len(calls) == 2, opt_cls  # the step invalidated it
        assert not torch.equal(y3, y1)
        torch.testing.assert_close(y3, fresh(layer), rtol=0, atol=0)
        with torch.no_grad():
            layer.weight.copy_(w)  # load_state_dict-style in-place update
        torch.testing.assert_close(layer(x), y1, rtol=0, atol=0)
        assert len(calls) == 3

    # a frozen weight is not re-quantized by other parameters' optimizer steps
    frozen = FP8Linear(256, 130, bias=False).requires_grad_(False)
    other = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([other], lr=1.0)
    calls.clear()
    frozen(x)
    other.grad = torch.ones(3)
    opt.step()
    frozen(x)
    assert len(calls) == 1
    # the cache never keeps a parameter alive, and can be switched off
    ref = weakref.ref(frozen.weight)
    del frozen
    gc.collect()
    assert ref() is None
    monkeypatch.setenv(L.WEIGHT_CACHE_ENV, "0")
    layer = FP8Linear(256, 130, bias=False)
    calls.clear()
    layer(x)
    layer(x)
    assert len(calls) == 2


def test_fp8_linears_run_eagerly_inside_a_compiled_block():
    """`torch_compile: true` compiles each decoder block around its FP8 layers: one graph break at each FP8
    linear and nothing traced inside it. Traced, the autograd Function broke the graph inside itself and
    Dynamo compiled the quantizers' frames per weight shape (18 breaks and 26 frames for these four
    layers); without that break torch 2.13 fails on the second FP8 linear under dynamic shapes. Eager inside,
    the block's output and gradients are bit for bit those of the uncompiled block, at every row count."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    dims = [256, 128, 384, 128, 256]
    a, b, c, d = (FP8Linear(i, o, bias=False) for i, o in zip(dims, dims[1:]))

    def block(x):  # straight-line, as a decoder block calls its projections
        x = torch.nn.functional.silu(a(x)) * 1.5
        x = torch.nn.functional.silu(b(x)) * 1.5
        x = torch.nn.functional.silu(c(x)) * 1.5
        return torch.nn.functional.silu(d(x)) * 1.5

    compiled = torch.compile(block, backend="aot_eager", dynamic=True)
    for rows in (64, 96, 80):
        x = torch.randn(1, rows, 256)
        runs = []
        for fn in (block, compiled):
            xi = x.clone().requires_grad_(True)
            y = fn(xi)
            y.square().sum().backward()
            runs.append((y.detach(), xi.grad, [m.weight.grad for m in (a, b, c, d)]))
            for m in (a, b, c, d):
                m.weight.grad = None
        torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)
    reasons = list(counters["graph_break"])
    assert sum(counters["graph_break"].values()) == 4, reasons  # the four FP8 calls of the first trace
    assert all("FP8Linear.forward" in r for r in reasons), reasons
    assert counters["frames"]["total"] <= 5, dict(counters["frames"])  # the block and its resumes, no more
