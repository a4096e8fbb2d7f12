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
from torch.utils._python_dispatch import TorchDispatchMode

from fp8_torch_contract import FakeScaledGroupedMM
from posttrain.fp8 import experts
from posttrain.fp8.experts import fp8_grouped_linear, grouped_backend
from posttrain.fp8.linear import FP8Recipe


def _fq_rows(t: torch.Tensor) -> torch.Tensor:
    """Independent row-wise e4m3 fake quantization over the last dim (no posttrain code); scales are
    amax * float32(1/448), as on every posttrain backend (posttrain/fp8/quant.py)."""
    amax = t.float().abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax * torch.tensor(1 / 448, dtype=torch.float32), torch.ones_like(amax))
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

    _assert_probe_rejects_wrong_numbers(monkeypatch, caplog, F, "scaled_grouped_mm", fake, experts._probe_grouped)


def _assert_probe_rejects_wrong_numbers(monkeypatch, caplog, owner, name, fake, probe):
    """`probe` says no, and logs why, when the kernel `owner.name` is 2% off its contract-checked `fake`."""

    def off_by_two_percent(*args, **kw):
        return (fake(*args, **kw).float() * 1.02).to(torch.bfloat16)

    monkeypatch.setattr(owner, name, off_by_two_percent)
    with caplog.at_level(logging.WARNING, logger="posttrain.fp8.experts"):
        assert probe(torch.device("cpu")) is False
    assert "disagrees" in caplog.text


def _fp8_experts_module() -> nn.Module:
    """transformers' DeepseekV3Experts (8 experts, top-2, 256 -> 128) on the "posttrain_fp8" implementation."""
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
    return holder


def test_transformers_experts_module_runs_on_the_grouped_path(grouped_fake):
    """The registered "posttrain_fp8" experts implementation reaches the grouped kernel end to end."""
    holder = _fp8_experts_module()
    hidden = torch.randn(12, 256, requires_grad=True)
    top_w, top_i = torch.sigmoid(torch.randn(12, 8)).topk(2, dim=-1)
    out = holder.experts(hidden, top_i, top_w)
    out.square().sum().backward()
    assert len(grouped_fake.calls) == 4  # two projections, forward and dgrad each
    assert float(holder.experts.down_proj.grad.abs().sum()) > 0 and hidden.grad is not None


def test_fp8_experts_run_eagerly_inside_a_compiled_block():
    """Under `torch_compile: true` the FP8 experts are one graph break in the compiled block, not traced
    (their token counts and the per-step weight cache are host state): the block gives the uncompiled
    block's output and gradients bit for bit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    holder = _fp8_experts_module()
    experts = holder.experts

    def block(h, top_i, top_w):
        return experts(torch.nn.functional.silu(h), top_i, top_w) * 2.0

    compiled = torch.compile(block, backend="aot_eager", dynamic=True)
    for tokens in (12, 20):
        h = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(tokens))
        top_w, top_i = torch.sigmoid(torch.randn(tokens, 8, generator=torch.Generator().manual_seed(1))).topk(2, -1)
        runs = []
        for fn in (block, compiled):
            hi = h.clone().requires_grad_(True)
            out = fn(hi, top_i, top_w)
            out.square().sum().backward()
            runs.append((out.detach(), hi.grad, experts.gate_up_proj.grad, experts.down_proj.grad))
            experts.gate_up_proj.grad = experts.down_proj.grad = None
        torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)
    reasons = list(counters["graph_break"])
    assert reasons and all("fp8_experts_forward" in r for r in reasons), reasons


# --- the FP8 wgrad: torch's 2d x 2d grouped FP8 GEMM (torch._scaled_grouped_mm) ---------------------------

_real_scaled_grouped_mm = getattr(torch, "_scaled_grouped_mm", None)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class MetaCheckedWgrad:
    """Stand-in for ``torch._scaled_grouped_mm``'s 2d x 2d case. torch's own meta kernel checks the call
    (dtypes, row-major mat_a, column-major mat_b, 16-byte strides, scale sizes E*N and E*K, int32 offsets);
    what the CUDA kernel's data preparation asserts (GroupMMCommon.cuh) is checked on `offs`: each run starts
    16-byte aligned, no group is empty (for a row-major mat_a, in torch versions since pytorch#153226), the
    last run ends within the operands (rows past it belong to no group). The product is computed in float64, reading the scales
    group-major; the rows past the last run are not read."""

    def __init__(self, compute: bool = True):
        self.calls, self.compute = [], compute

    def __call__(self, a, b, sa, sb, offs=None, out_dtype=None):
        out = _real_scaled_grouped_mm(_meta(a), _meta(b), _meta(sa), _meta(sb), offs=_meta(offs), out_dtype=out_dtype)
        ends = offs.tolist()
        assert all(e % experts.WGRAD_RUN_ALIGN == 0 for e in ends) and ends[-1] <= a.shape[1], ends
        assert all(end > start for start, end in zip([0] + ends, ends)), f"an empty group: {ends}"
        self.calls.append((tuple(a.shape), tuple(b.shape), tuple(ends)))
        n, k = a.shape[0], b.shape[1]
        result = torch.full(out.shape, float("nan"), dtype=torch.float64)
        start = 0
        for g, end in enumerate(ends):
            if end > start and self.compute:
                result[g] = (a[:, start:end].double() * sa[g * n:(g + 1) * n, None].double()) @ (
                    b[start:end].double() * sb[g * k:(g + 1) * k][None, :].double())
            elif end > start:
                result[g] = 0.0
            start = end
        return result.to(torch.bfloat16)


@pytest.fixture
def wgrad_fake(monkeypatch):
    if _real_scaled_grouped_mm is None:
        pytest.skip("this torch has no _scaled_grouped_mm")
    fake = MetaCheckedWgrad()
    monkeypatch.setattr(torch, "_scaled_grouped_mm", fake)
    return fake


def _fq_cols(t: torch.Tensor) -> torch.Tensor:
    """Independent e4m3 fake quantization with one scale per column (over the rows given)."""
    return _fq_rows(t.T).T


@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)])  # V3's gate_up [E, 2I, H] and down [E, H, I]
def test_fp8_wgrad_operands_pass_torch_s_checks_on_the_v3_expert_shapes(wgrad_fake, n, k):
    wgrad_fake.compute = False
    counts = (5, 0, 37, 16, 1)
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(sum(counts), n, generator=g).to(torch.bfloat16)
    x = torch.randn(sum(counts), k, generator=g).to(torch.bfloat16)
    dw = experts.fp8_grouped_wgrad(dy, x, counts, FP8Recipe())
    assert dw.shape == (len(counts), n, k)
    (a_shape, b_shape, ends), = wgrad_fake.calls
    # runs padded to 16 tokens, the empty expert's run 16 zero tokens; the buffer has (59 // 16 + 5) * 16 rows,
    # a bound from the shapes (the padded total, 112, is not read on the host)
    assert a_shape == (n, 128) and b_shape == (128, k) and ends == (16, 32, 80, 96, 112)
    assert float(dw[1].abs().sum()) == 0.0  # the expert without tokens


def test_fp8_wgrad_is_the_per_expert_recipe_and_within_e4m3_of_the_exact_gradient(wgrad_fake):
    """dW_e = Q_col(dy_e)^T Q_col(x_e), one scale per (expert, channel) over the expert's tokens."""
    counts, x, w, gy = _problem(seed=2)
    dy, xb = gy.to(torch.bfloat16), x.to(torch.bfloat16)
    dw = experts.fp8_grouped_wgrad(dy, xb, tuple(counts), FP8Recipe()).float()
    ref = torch.zeros_like(dw)
    exact = torch.zeros_like(dw)
    start = 0
    for e, c in enumerate(counts):
        sl = slice(start, start + c)
        if c:
            ref[e] = _fq_cols(dy[sl]).T @ _fq_cols(xb[sl])
            exact[e] = dy[sl].float().T @ xb[sl].float()
        start += c
    torch.testing.assert_close(dw, ref, rtol=2**-7, atol=1e-3)  # bf16 output
    rel = float((dw - exact).norm() / exact.norm())
    assert 1e-3 < rel < 5e-2, rel  # issue #13's e4m3 bound for gradients
    assert torch.isfinite(dw).all() and float(dw[1].abs().sum()) == 0.0


def test_the_grouped_backward_takes_the_fp8_wgrad_where_it_is_enabled(grouped_fake, wgrad_fake, monkeypatch):
    counts, x, w, gy = _problem(seed=3)
    wp = nn.Parameter(w.clone())
    fp8_grouped_linear(x, wp, counts, FP8Recipe()).backward(gy)
    assert wgrad_fake.calls == []  # on CPU, "auto" never picks it
    monkeypatch.setenv(experts.WGRAD_ENV, "fp8")
    wp.grad = None
    fp8_grouped_linear(x, wp, counts, FP8Recipe()).backward(gy)
    assert len(wgrad_fake.calls) == 1
    exact = torch.stack([gy[sum(counts[:e]):sum(counts[:e + 1])].T @ x[sum(counts[:e]):sum(counts[:e + 1])]
                         for e in range(len(counts))])
    rel = float((wp.grad - exact).norm() / exact.norm())
    assert rel < 5e-2, rel
    monkeypatch.setenv(experts.WGRAD_ENV, "bf16")
    fp8_grouped_linear(x, wp, counts, FP8Recipe()).backward(gy)
    assert len(wgrad_fake.calls) == 1


def test_the_fp8_wgrad_requantizes_x_from_the_forward_s_fp8_cache(grouped_fake, wgrad_fake, monkeypatch):
    """X^T's runs come from the cached row-wise fp8 X and its per-token scales, dequantized in float32 inside the
    quantizer: no bf16 copy of X (the previous path rounded X to bf16 first, a second rounding)."""
    monkeypatch.setenv(experts.WGRAD_ENV, "fp8")
    counts, x, w, gy = _problem(seed=4)
    wp = nn.Parameter(w.clone())
    fp8_grouped_linear(x, wp, counts, FP8Recipe()).backward(gy)
    xq, xs = experts.quantize_rows(x)
    want = experts.fp8_grouped_wgrad(gy.to(torch.bfloat16), xq.float() * xs[:, None], tuple(counts), FP8Recipe())
    assert torch.equal(wp.grad, want.float())
    bf16_copy = experts.fp8_grouped_wgrad(gy.to(torch.bfloat16), (xq.float() * xs[:, None]).to(torch.bfloat16),
                                          tuple(counts), FP8Recipe())
    assert not torch.equal(wp.grad, bf16_copy.float())  # the case tells the two apart


def test_the_fp8_wgrad_lays_out_the_runs_once_for_both_operands(wgrad_fake, monkeypatch):
    """dY^T and X^T run over the same tokens: on the Triton backend both launches get one layout (a dozen tiny
    kernels on [E] each time it is computed), and dW is what the eager quantizers give."""
    from posttrain.fp8 import triton_quant

    counts, x, w, gy = _problem(seed=5)
    dy, xb = gy.to(torch.bfloat16), x.to(torch.bfloat16)
    want = experts.fp8_grouped_wgrad(dy, xb, tuple(counts), FP8Recipe())
    layouts = []

    def runs(t, counts, starts, padded_starts, padded, rows, scale_fmt, align=16, row_scale=None):
        layouts.append((starts, padded_starts, padded))
        q, s, _ = experts.quantize_token_runs_reference(t, counts, scale_fmt, row_scale)
        assert q.shape[1] == rows
        return q, s

    monkeypatch.setattr(triton_quant, "quantize_token_runs", runs)
    monkeypatch.setattr(experts, "quant_backend", lambda device: "triton")
    got = experts.fp8_grouped_wgrad(dy, xb, tuple(counts), FP8Recipe())
    assert len(layouts) == 2 and all(a is b for a, b in zip(*layouts))
    assert torch.equal(got, want)


def test_wgrad_probe_accepts_the_kernel_and_rejects_wrong_numbers(wgrad_fake, monkeypatch, caplog):
    assert experts._probe_grouped_wgrad(torch.device("cpu")) is True
    _assert_probe_rejects_wrong_numbers(monkeypatch, caplog, torch, "_scaled_grouped_mm", wgrad_fake,
                                        experts._probe_grouped_wgrad)


# --- no host synchronization on the rowwise path (forward, dgrad, FP8 wgrad) ------------------------------


def _unrecorded(fn, rec):
    """``fn`` with whatever host reads it makes left out of ``rec``: the CPU stand-ins for the kernels read
    ``offs`` on the host to check it, where the real kernels read it on the device."""

    def call(*args, **kwargs):
        n = len(rec.syncs)
        try:
            return fn(*args, **kwargs)
        finally:
            del rec.syncs[n:]

    return call


def test_the_rowwise_experts_step_never_waits_for_the_device(grouped_fake, wgrad_fake, monkeypatch):
    """Routing counts, offsets, the wgrad's padded runs and the zeroing of experts without tokens stay on
    the device: no .tolist()/.item(), no tensors from Python data, no value-dependent shapes, per layer."""
    from host_sync import HostSyncRecorder

    monkeypatch.setenv(experts.WGRAD_ENV, "fp8")
    holder = _fp8_experts_module()
    hidden = torch.randn(12, 256, requires_grad=True)
    top_w = torch.rand(12, 2)
    top_i = torch.stack([torch.arange(12) % 3, 3 + torch.arange(12) % 4], dim=-1)  # expert 7 gets no token
    with HostSyncRecorder() as rec:
        monkeypatch.setattr(F, "scaled_grouped_mm", _unrecorded(grouped_fake, rec))
        monkeypatch.setattr(torch, "_scaled_grouped_mm", _unrecorded(wgrad_fake, rec))
        out = holder.experts(hidden, top_i, top_w)
        out.square().sum().backward()
    assert len(grouped_fake.calls) == 4 and len(wgrad_fake.calls) == 2  # every kernel ran under the recorder
    assert rec.syncs == []
    assert float(holder.experts.down_proj.grad[7].abs().sum()) == 0.0
    assert torch.isfinite(holder.experts.gate_up_proj.grad).all() and torch.isfinite(hidden.grad).all()


# --- the blockwise (per-expert) backward holds one dW stack, in the weight's dtype ------------------------


class _StackSizedOutputs(TorchDispatchMode):
    """Records (dtype, storage) of every op output in 16 or 32 bits with at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.element_size() >= 2 and t.numel() >= self.numel:
                self.seen.add((t.dtype, t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("backward", ["fp8", "bf16"])
def test_the_blockwise_backward_allocates_one_dw_stack_in_the_weight_dtype(backward):
    """A float32 dW of the whole [E, N, K] stack and then its cast held two stacks at once (28 + 14 GiB at
    V3's 256 x 4096 x 7168 in bf16: out of memory on an 80 GB H100); each expert's float32 dW is now
    written into its slice of one stack in the weight's dtype, with the same rounding."""
    counts, x, w, gy = _problem(seed=4)
    xr = x.to(torch.bfloat16).requires_grad_(True)
    wp = nn.Parameter(w.to(torch.bfloat16))
    recipe = FP8Recipe(grouped="blockwise", backward=backward)
    y = fp8_grouped_linear(xr, wp, counts, recipe)
    with _StackSizedOutputs(wp.numel()) as rec:
        dx, dw = torch.autograd.grad(y, [xr, wp], gy.to(torch.bfloat16))
    assert [dtype for dtype, _ in rec.seen] == [torch.bfloat16]  # one stack: dW itself
    assert dw.dtype == torch.bfloat16 and float(dw[1].abs().sum()) == 0.0  # the expert without tokens


def _fp8_tensors_of(numel: int) -> dict[int, torch.Tensor]:
    """The live fp8 tensors of ``numel`` elements by id (other tests in the process may have left some; holding
    them keeps their ids from being reused)."""
    import gc

    gc.collect()
    return {id(o): o for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and o.dtype == torch.float8_e4m3fn and o.numel() == numel}


@pytest.mark.parametrize("layer", ["linear", "experts blockwise", "experts rowwise"])
def test_without_the_weight_cache_no_fp8_weight_outlives_the_forward(grouped_fake, monkeypatch, layer):
    """Under FSDP (more than one rank) the per-step FP8 weight cache is off, and the weights are unsharded only
    around each layer's forward and backward. An FP8 weight kept from the forward until the layer's backward
    would hold an FP8 copy of every unsharded weight at once (about 650 GB for V3's experts): none is kept;
    the backward quantizes again from the weight it saved (FSDP gathers it again for the backward), with the
    same gradients as with the cache."""
    from posttrain.fp8 import linear as L

    counts, x, w, gy = _problem(seed=4, n=384, k=256)
    if layer == "linear":
        w, gy = w[0], gy
        run = lambda x, w: L.fp8_linear(x, w)  # noqa: E731
    else:
        recipe = FP8Recipe(grouped=layer.split()[1])
        run = lambda x, w: fp8_grouped_linear(x, w, counts, recipe)  # noqa: E731
    grads = {}
    for cache in ("1", "0"):
        monkeypatch.setenv(L.WEIGHT_CACHE_ENV, cache)
        L.clear_weight_cache()
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        before = _fp8_tensors_of(w.numel())
        y = run(xi, wi)
        alive = len(_fp8_tensors_of(w.numel()).keys() - before.keys())
        if cache == "0":
            assert alive == 0, f"{alive} FP8 copies of the weight kept for the backward"
        else:
            assert alive >= 1  # the cached copy, kept for the next micro-batch anyway
        y.backward(gy)
        grads[cache] = (y.detach(), xi.grad, wi.grad)
    for a, b in zip(grads["1"], grads["0"]):
        assert torch.equal(a, b)
