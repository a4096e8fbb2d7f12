"""posttrain/routed_experts.py: the routed experts' dispatch and combine, fused on CUDA, transformers' elsewhere.

* The combine (report §2.1.2: each token's K expert outputs times their gating values, summed) and the
  dispatch's backward by the Triton kernels are within the fp32 error bound of the exact (float64) sums,
  rounded once; the rows' gradient is w·dy rounded once, the bits transformers' autograd gives; the gating
  values' gradient is within the fp32 bound of the exact dot products.
* The SwiGLU gating between the grouped GEMMs is the kernel tests/test_swiglu.py checks.
* The experts layer through the kernels is as close to the float64 layer as transformers' own grouped_mm
  layer, in value and in every gradient; the FP8 experts take the same kernels.
* The kernels run only where they are meant to (CUDA, not compiling, not switched off, start-up check
  passed); on the CPU the model's default experts are transformers' grouped_mm function itself.

The kernels run under Triton's CPU interpreter in a fresh process (``python tests/test_routed_experts.py``
with ``TRITON_INTERPRET=1``, one JSON line); on CUDA the same cases run compiled (``-m gpu``).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import torch
from kernel_calls import assert_start_up_check_failed_once, break_kernel, recorded_calls  # noqa: E402
from subprocess_env import run_in_triton_interpreter  # noqa: E402

from posttrain import routed_experts as R
from posttrain.start_up_check import device_key


# -- the cases, run in the interpreter (CPU) or compiled (CUDA) ---------------------------------------------
def _sum_case(device: str, tokens: int, top_k: int, hidden: int, dtype: torch.dtype, weighted: bool, seed: int) -> dict:
    """The kernels' forward and backward on random routed rows against float64: the largest error over its bound."""
    g = torch.Generator().manual_seed(seed)
    rows64 = torch.randn(tokens * top_k, hidden, generator=g, dtype=torch.float64)
    rows64 *= 10.0 ** torch.randint(-3, 4, (tokens * top_k, 1), generator=g)  # rows of very different scales
    rows = rows64.to(device, dtype)
    slots = torch.randperm(tokens * top_k, generator=g).view(tokens, top_k).to(device)
    w = torch.rand(tokens, top_k, generator=g, dtype=torch.float64).to(device, torch.float32) if weighted else None
    dy = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).to(device, dtype)
    out = R.sum_rows(rows, slots, w, dtype)
    x = rows.double().cpu()[slots.cpu()]  # [T, K, H] as stored
    terms = x * w.double().cpu().unsqueeze(-1) if weighted else x
    exact = terms.sum(1)
    bound = R.combine_error_bound(terms.abs().sum(1), exact, top_k, dtype)
    r = {"forward err/bound": float(((out.double().cpu() - exact).abs() / bound).max()),
         "forward dtype": str(out.dtype), "forward nonzero": bool(out.abs().sum() > 0)}
    if weighted:
        d_rows, dw = R.sum_rows_backward(dy, rows, slots, w)
        # transformers' combine under autograd gives the rows' gradient: (fp32 dy · fp32 w) cast to the rows' dtype
        ref_rows = rows.detach().clone().requires_grad_(True)
        weighted_rows = ref_rows * w.reshape(-1)[torch.argsort(slots.reshape(-1))].unsqueeze(-1)
        weighted_rows[slots.reshape(-1)].view(tokens, top_k, hidden).sum(1).to(dtype).backward(dy)
        prods = x * dy.double().cpu().unsqueeze(1)
        exact_dw = prods.sum(-1)
        dw_bound = R.combine_error_bound(prods.abs().sum(-1), exact_dw, hidden, torch.float32)
        d_rows_only, no_dw = R.sum_rows_backward(dy, rows, slots, w, need_dw=False)
        r.update({"d_rows equal autograd's": torch.equal(d_rows, ref_rows.grad),
                  "dw err/bound": float(((dw.double().cpu() - exact_dw).abs() / dw_bound).max()),
                  "dw dtype": str(dw.dtype), "without dw": no_dw is None and torch.equal(d_rows_only, d_rows)})
    return r


def _experts_module(device: str, dtype: torch.dtype, experts: int = 8, hidden: int = 96, inter: int = 40):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    torch.manual_seed(0)
    cfg = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts,
                           num_experts_per_tok=6, n_group=1, topk_group=1)
    mod = DeepseekV3Experts(cfg)
    with torch.no_grad():
        mod.gate_up_proj.copy_(torch.randn_like(mod.gate_up_proj) * hidden**-0.5)
        mod.down_proj.copy_(torch.randn_like(mod.down_proj) * inter**-0.5)
    return mod.to(device, dtype)


def _launches():
    """Records the fused kernels' launches by name while active: "combine", "dispatch backward", "swiglu"."""
    return recorded_calls(R, {"sum_rows": lambda *a, **k: "combine" if a[2] is not None else "dispatch backward",
                              "silu_mul": "swiglu"})


def _layer_run(mod, forward, x, idx, wts, gy):
    x, wts = x.detach().clone().requires_grad_(True), wts.detach().clone().requires_grad_(True)
    mod.zero_grad()
    y = forward(mod, x, idx, wts)
    y.backward(gy)
    return [t.detach().double().cpu() for t in (y, x.grad, wts.grad, mod.gate_up_proj.grad, mod.down_proj.grad)]


def _layer_case(device: str) -> dict:
    """The fp32 experts layer through the kernels and through transformers' grouped_mm, each against the same
    layer in float64 (transformers' per-expert loop): max error of ours / max error of transformers'."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    mod = _experts_module(device, torch.float32)
    tokens, experts = 37, mod.num_experts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, mod.hidden_dim, generator=g).to(device)
    idx = torch.rand(tokens, experts, generator=g).topk(6, dim=-1).indices.to(device)
    idx[:5] = torch.arange(6)  # expert 7 gets fewer tokens; one with none is covered by the random draw or not
    wts = torch.rand(tokens, 6, generator=g).to(device)
    gy = torch.randn(tokens, mod.hidden_dim, generator=g).to(device)
    with _launches() as launches:
        ours = _layer_run(mod, R.fused_grouped_experts_forward, x, idx, wts, gy)
    hf = _layer_run(mod, grouped_mm_experts_forward, x, idx, wts, gy)
    mod64 = _experts_module("cpu", torch.float64)
    mod64.load_state_dict({k: v.double().cpu() for k, v in mod.state_dict().items()})
    exact = _layer_run(mod64, type(mod64).forward.__wrapped__, x.double().cpu(), idx.cpu(), wts.double().cpu(),
                       gy.double().cpu())
    names = ("y", "d hidden", "d gating values", "d gate_up_proj", "d down_proj")
    ratios = {}
    for name, a, b, e in zip(names, ours, hf, exact):
        ours_err, hf_err = float((a - e).abs().max()), float((b - e).abs().max())
        ratios[name] = ours_err / max(hf_err, 1e-300) if ours_err > 0 else 0.0
    return {"err ours / err transformers": ratios, "launches": list(launches)}


def _fp8_case(device: str) -> dict:
    """The FP8 experts take the same dispatch and combine: with the kernels their output and input gradient are
    the eager ops' within the combine's rounding."""
    from posttrain.fp8.experts import fp8_experts_forward

    mod = _experts_module(device, torch.bfloat16, hidden=256, inter=128)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 256, generator=g).to(device, torch.bfloat16)
    idx = torch.rand(24, mod.num_experts, generator=g).topk(6, dim=-1).indices.to(device)
    wts = torch.rand(24, 6, generator=g).to(device)
    gy = torch.randn(24, 256, generator=g).to(device, torch.bfloat16)
    with _launches() as launches:
        fused = _layer_run(mod, fp8_experts_forward, x, idx, wts, gy)
        os.environ[R.FUSED_ROUTING_ENV] = "0"
        try:
            eager = _layer_run(mod, fp8_experts_forward, x, idx, wts, gy)
        finally:
            os.environ.pop(R.FUSED_ROUTING_ENV)
    rel = {n: float((a - b).norm() / b.norm()) for n, a, b in zip(("y", "d hidden"), fused, eager)}
    return {"relative difference": rel, "launches": list(launches)}


def run_cases(device: str) -> dict:
    R._checked.clear()
    key = device_key(device)  # cuda:0 on CUDA, as the layer's tensors name it
    R._checked[key] = R._start_up_check(torch.device(key))  # its launches are not counted
    results = {"start-up check": R._checked[key]}
    for name, args in {
        "bf16, K=6, H=200 (a partial column block)": (13, 6, 200, torch.bfloat16, True, 0),
        "fp32, K=8, H=1100 (two column blocks, a partial one)": (5, 8, 1100, torch.float32, True, 1),
        "bf16, K=1": (9, 1, 64, torch.bfloat16, True, 2),
        "unweighted (the dispatch's backward), bf16, K=6": (11, 6, 130, torch.bfloat16, False, 3),
        "unweighted, fp32, K=3": (4, 3, 1030, torch.float32, False, 4),
    }.items():
        results[name] = _sum_case(device, *args)
    results["layer"] = _layer_case(device)
    results["fp8 experts"] = _fp8_case(device)
    return results


def _assert_cases(results: dict) -> None:
    results = dict(results)
    assert results.pop("start-up check") is None
    layer = results.pop("layer")
    # forward: SwiGLU, combine; backward (the combine's and SwiGLU's own kernels are not counted): the dispatch's
    assert layer["launches"] == ["swiglu", "combine", "dispatch backward"], layer
    for name, ratio in layer["err ours / err transformers"].items():
        # both fp32 paths differ from float64 by rounding in another order; a wrong index or weight is O(1) off
        assert ratio <= 4.0, (name, layer)
    fp8 = results.pop("fp8 experts")
    assert fp8["launches"] == ["swiglu", "combine", "dispatch backward"], fp8
    # the two runs quantize gated activations up to one bf16 step apart; each e4m3 value is then at most one
    # e4m3 step (2^-3 relative) apart, and the rest is the same code on the same inputs
    assert fp8["relative difference"]["y"] <= 2.0**-3 and fp8["relative difference"]["d hidden"] <= 2.0**-3, fp8
    for name, r in results.items():
        assert r["forward nonzero"], name
        assert r["forward err/bound"] <= 1.0, (name, r)
        if "d_rows equal autograd's" in r:
            assert r["d_rows equal autograd's"] and r["without dw"], (name, r)
            assert r["dw err/bound"] <= 1.0 and r["dw dtype"] == "torch.float32", (name, r)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_in_triton_interpreter(__file__)


def test_fused_dispatch_and_combine_are_within_the_fp32_bound_in_the_interpreter(interpreted):
    """Combine forward and the dispatch's backward within the fp32 error bound of the exact sums (K = 1, 3, 6, 8;
    bf16 and fp32; partial column blocks); the rows' gradient is transformers' autograd's bit for bit; the gating
    values' gradient within the bound of the exact dot products; the experts layer and the FP8 experts through
    the kernels as accurate as transformers' own; the start-up check (SwiGLU's included) passes."""
    _assert_cases(interpreted)


@pytest.mark.gpu
def test_fused_dispatch_and_combine_on_cuda(monkeypatch):
    _assert_cases(run_cases("cuda"))


def test_the_kernels_compile_for_the_h100_with_vector_loads_and_stores():
    """Each kernel compiles for sm_90 here (tests/triton_ptx.py) and moves bf16 rows in vectors: they are
    memory-bound, and scalar accesses would waste most of the bandwidth they are for."""
    import re

    if R.triton is None:
        pytest.skip("Triton is not installed")
    from triton_ptx import h100_ptx


    rows = {"rows_ptr": "bf16", "slot_ptr": "i64", "w_ptr": "fp32", "out_ptr": "bf16"}
    configs = {
        "combine, K=8": (R._sum_rows_kernel, rows, dict(K=8, KP=8, HAS_W=True, OUT_BF16=True, BLOCK_H=1024)),
        "combine, K=6 (padded to 8)": (R._sum_rows_kernel, rows, dict(K=6, KP=8, HAS_W=True, OUT_BF16=True,
                                                                        BLOCK_H=1024)),
        "dispatch backward": (R._sum_rows_kernel, rows, dict(K=8, KP=8, HAS_W=False, OUT_BF16=True, BLOCK_H=1024)),
        "combine backward": (R._sum_rows_backward_kernel,
                             {"dy_ptr": "bf16", "rows_ptr": "bf16", "slot_ptr": "i64", "w_ptr": "fp32",
                              "d_rows_ptr": "bf16", "dw_ptr": "fp32"},
                             dict(K=8, KP=8, NEED_DW=True, D_ROWS_BF16=True, DW_BF16=False, BLOCK_H=512)),
    }
    for name, (kernel, pointers, constexprs) in configs.items():
        ptx = h100_ptx(kernel, pointers, constexprs)
        assert re.search(r"ld\.global(\.\w+)*\.v[24]", ptx), name
        assert re.search(r"st\.global(\.\w+)*\.v[24]", ptx), name


# -- where the kernels run ---------------------------------------------------------------------------------
def test_route_sorts_pairs_by_expert_stably_and_inverts_the_order():
    idx = torch.tensor([[2, 0], [1, 2], [0, 3], [2, 1]])
    routing = R.route(idx, num_experts=5)
    flat = idx.reshape(-1)
    assert flat[routing.order].tolist() == sorted(flat.tolist())
    assert routing.order.tolist() == [1, 4, 2, 7, 0, 3, 6, 5]  # one expert's pairs in token order
    assert routing.counts.tolist() == [2, 2, 3, 1, 0]
    assert torch.equal(routing.order[routing.slots.reshape(-1)], torch.arange(8)) and routing.top_k == 2


def test_eager_dispatch_and_combine_are_transformers_ops(monkeypatch):
    """Off CUDA `combine` is transformers' formula (the product in fp32, one cast), `dispatch` a gather."""
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(10, 8, generator=g).topk(3, dim=-1).indices
    routing = R.route(idx, 8)
    hidden = torch.randn(10, 16, generator=g).bfloat16()
    rows = torch.randn(30, 16, generator=g).bfloat16()
    w = torch.rand(10, 3, generator=g)
    assert torch.equal(R.dispatch(hidden, routing, kernels=False), hidden[routing.order // 3])
    out = R.combine(rows, routing, w, torch.bfloat16, kernels=False)
    by_hand = torch.zeros(10, 16)
    for t in range(10):
        for j in range(3):
            by_hand[t] += rows[routing.slots[t, j]].float() * w[t, j]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), by_hand.bfloat16().float(), rtol=2.0**-8, atol=0)


def test_kernels_run_only_on_cuda_not_compiling_and_not_switched_off(monkeypatch):
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    monkeypatch.setattr(R, "_checked", {"cpu": None})  # as if the check had passed on this device
    assert not R.fused_routing_usable(x)  # the CPU is not a fused device
    monkeypatch.setattr(R, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    if R.triton is None:
        pytest.skip("Triton is not installed")
    assert R.fused_routing_usable(x)
    assert not R.fused_routing_usable(x.to(torch.float64))
    monkeypatch.setenv(R.FUSED_ROUTING_ENV, "0")
    assert not R.fused_routing_usable(x)
    monkeypatch.delenv(R.FUSED_ROUTING_ENV)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not R.fused_routing_usable(x)


def test_a_failed_start_up_check_keeps_the_eager_ops_with_one_warning(monkeypatch, caplog):
    calls = break_kernel(monkeypatch, R, "sum_rows")
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger=R.__name__):
        assert not R.fused_routing_usable(x) and not R.fused_routing_usable(x)
    assert_start_up_check_failed_once(R, calls, caplog.records)
    # the experts then run transformers' function
    mod = _experts_module("cpu", torch.float32)
    idx = torch.rand(6, 8).topk(6, dim=-1).indices
    from transformers.integrations.moe import grouped_mm_experts_forward

    h, w = torch.randn(6, mod.hidden_dim), torch.rand(6, 6)
    assert torch.equal(R.fused_grouped_experts_forward(mod, h, idx, w), grouped_mm_experts_forward(mod, h, idx, w))


def test_the_swiglu_kernel_replaces_only_transformers_default_gating():
    mod = _experts_module("cpu", torch.float32)
    assert R.gates_with_default_swiglu(mod)  # DeepseekV3Experts: silu(gate) * up on [gate | up]

    class OwnGate(type(mod)):
        def _apply_gate(self, h):
            return h[:, : h.shape[1] // 2]

    mod.__class__ = OwnGate
    assert not R.gates_with_default_swiglu(mod)
    mod.__class__ = OwnGate.__mro__[1]
    mod.act_fn = torch.nn.GELU()
    assert not R.gates_with_default_swiglu(mod)


def test_the_model_default_becomes_posttrain_grouped_and_other_choices_stay(tmp_path):
    from transformers import DeepseekV3Config

    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                           n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=16,
                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    model = DeepseekV3ForCausalLMWithMTP(cfg)
    assert model.config._experts_implementation == R.EXPERTS_IMPLEMENTATION
    model.save_pretrained(tmp_path)
    assert R.EXPERTS_IMPLEMENTATION not in (tmp_path / "config.json").read_text()  # a private attribute, not saved
    model.set_experts_implementation("eager")
    assert not R.use_fused_experts(model) and model.config._experts_implementation == "eager"


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the tests in this file do)")
    R.FUSED_DEVICE_TYPES = ("cuda", "cpu")  # the kernels on CPU tensors, interpreted
    print(json.dumps(run_cases("cpu")))
