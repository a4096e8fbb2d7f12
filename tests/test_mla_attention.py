"""posttrain/mla_attention.py: MLA's query/key/value assembly as one Triton kernel each way on CUDA,
transformers' eager ops elsewhere.

* The kernels' query and key, and the gradients of q, kv and the shared k_rope, are within their fp32 bounds of
  float64 rounded once; the nope parts, v and their gradients are exact copies; v is a view of kv_b_proj's
  output. Gradients may come in any strides; an output left out of the loss gets zeros.
* The attention layer through the kernels is transformers' layer: in fp32 to fp32 rounding, in bf16 at least
  as close to the float64 layer as transformers' own, in the output and every gradient. The tiny model through
  every fused kernel of the toolkit (these, the SwiGLU MLPs, the MoE routing) is the eager model in fp32.
* The kernels run only where they are meant to (CUDA, no KV cache, V3's interleaved rotary, not compiling, not
  switched off, start-up check passed); on the CPU the module is transformers' forward bit for bit, and
  every attention of the model (the MTP block's included) is the new class with its parameters.

The kernels run under Triton's CPU interpreter in a fresh process (``python tests/test_mla_attention.py`` with
``TRITON_INTERPRET=1``, one JSON line); on CUDA the same cases run compiled (``-m gpu``).
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
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from posttrain import mla_attention as M
from posttrain.start_up_check import device_key


def _config(q_lora_rank: int | None = 24, heads: int = 4, nope: int = 16, rope: int = 8, v_dim: int = 12):
    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=q_lora_rank,
                           kv_lora_rank=16, qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=v_dim,
                           vocab_size=32, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    return cfg


def _attention(cfg, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    mod = DeepseekV3Attention(cfg, layer_idx=0)
    with torch.no_grad():
        for p in mod.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.uniform_(0.5, 1.5)  # the RMSNorm weights
    return mod.to(device, dtype)


def _inputs(cfg, device: str, dtype: torch.dtype, seq: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, seq, cfg.hidden_size, generator=g).to(device, dtype)
    positions = torch.cat([torch.arange(4), torch.arange(seq - 4)]).view(1, seq).to(device)  # two packed samples
    cos, sin = DeepseekV3RotaryEmbedding(cfg).to(device)(x, positions)
    gy = torch.randn(1, seq, cfg.hidden_size, generator=g).to(device, dtype)
    return x, (cos, sin), gy


def _layer_run(mod, forward, x, pos, gy) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    mod.zero_grad()
    y, _ = forward(mod, x, pos, None)
    y.backward(gy)
    return [y.detach(), x.grad] + [p.grad for _, p in sorted(mod.named_parameters())]


# -- the cases, run in the interpreter (CPU) or compiled (CUDA) ---------------------------------------------
def _kernel_case(device: str, b: int, s: int, heads: int, nope: int, rope: int, v_dim: int, dtype: torch.dtype,
                 seed: int) -> dict:
    """The kernels on random projections against float64: the largest error over its bound per result."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q = (r(b, s, heads * (nope + rope)) * 10.0 ** torch.randint(-2, 3, (b, s, 1), generator=g)).to(device, dtype)
    kv = r(b, s, heads * (nope + v_dim)).to(device, dtype)
    k_rope = r(b, s, 24 + rope).to(device, dtype)[..., 24:]
    angles = torch.rand(b, s, 1, generator=g, dtype=torch.float64) * 100 * torch.rand(rope // 2, generator=g, dtype=torch.float64)
    cos = torch.cat([angles.cos()] * 2, -1).to(device, dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(device, dtype)
    query, key, value = M.mla_query_key_value(q, kv, k_rope, cos, sin, heads, nope, v_dim)  # [B, H, S, D] views
    dq = r(b, heads, s, nope + rope).to(device, dtype)  # contiguous as [B, H, S, D]: strided as [B, S, H, D]
    dk = r(b, s, heads, nope + rope).to(device, dtype).transpose(1, 2)
    dv = r(b, heads, s, v_dim + 8).to(device, dtype)[..., 8:]
    leaves = [t.detach().requires_grad_(True) for t in (q, kv)]
    compressed = torch.zeros(b, s, 24 + rope, dtype=dtype, device=device).requires_grad_(True)
    with torch.no_grad():
        compressed[..., 24:] = k_rope
    out = M.mla_query_key_value(leaves[0], leaves[1], compressed[..., 24:], cos, sin, heads, nope, v_dim)
    d_q, d_kv, d_compressed = torch.autograd.grad(out, (*leaves, compressed), (dq, dk, dv))
    want = M.float64_assembly(q, kv, k_rope, cos, sin, heads, nope, v_dim, dq.transpose(1, 2), dk.transpose(1, 2),
                              dv.transpose(1, 2), dtype)
    got = {"query": query.transpose(1, 2), "key": key.transpose(1, 2), "d q": d_q, "d kv": d_kv,
           "d k_rope": d_compressed[..., 24:]}
    result = {name: float(((got[name].double().cpu() - exact).abs() / bound.clamp_min(1e-300)).max())
              for name, (exact, bound) in want.items()}
    result["copies exact"] = all(float(((got[n].double().cpu() - e).abs() * (bd == 0)).max()) == 0
                                 for n, (e, bd) in want.items())
    result["d latent part zero"] = bool((d_compressed[..., :24] == 0).all())
    result["value is a view of kv"] = value.data_ptr() == kv.data_ptr() + nope * kv.element_size()
    result["dtypes"] = sorted({str(t.dtype) for t in (*got.values(), value)})
    # an output left out of the loss (here the value) gets zero gradient
    out = M.mla_query_key_value(leaves[0], leaves[1], compressed[..., 24:], cos, sin, heads, nope, v_dim)
    (d_kv_without_v,) = torch.autograd.grad((out[0] * dq).sum() + (out[1] * dk).sum(), leaves[1])
    v_part = d_kv_without_v.view(b, s, heads, nope + v_dim)[..., nope:]
    result["unused value: zero gradient"] = bool((v_part == 0).all())
    return result


def _launches():
    """Records the kernels' launches while active: "forward", "backward"."""
    return recorded_calls(M, {"query_key_forward": "forward", "query_key_backward": "backward"})


def _layer_case(device: str, q_lora_rank: int | None) -> dict:
    """transformers' attention layer and ours on the same weights and packed rows: fp32 against each other; bf16
    each against the float64 layer (max error of ours / max error of transformers' per output and gradient)."""
    cfg = _config(q_lora_rank)
    hf_forward = DeepseekV3Attention.forward
    ours_forward = M.DeepseekV3FusedAttention.forward
    result = {}
    mod = _attention(cfg, device, torch.float32)
    M.use_fused_mla(mod)
    x, pos, gy = _inputs(cfg, device, torch.float32)
    with _launches() as launches:
        ours = _layer_run(mod, ours_forward, x, pos, gy)
    hf = _layer_run(mod, hf_forward, x, pos, gy)
    result["fp32 max rel diff"] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, hf))
    result["launches"] = list(launches)
    mod16 = _attention(cfg, device, torch.bfloat16)
    M.use_fused_mla(mod16)
    x16, pos16, gy16 = _inputs(cfg, device, torch.bfloat16)
    ours = [t.double().cpu() for t in _layer_run(mod16, ours_forward, x16, pos16, gy16)]
    hf = [t.double().cpu() for t in _layer_run(mod16, hf_forward, x16, pos16, gy16)]
    mod64 = _attention(cfg, "cpu", torch.float64)
    mod64.load_state_dict({k: v.double().cpu() for k, v in mod16.state_dict().items()})
    exact = _layer_run(mod64, hf_forward, x16.double().cpu(), tuple(p.double().cpu() for p in pos16),
                       gy16.double().cpu())
    names = ["y", "d x"] + [n for n, _ in sorted(mod.named_parameters())]
    result["bf16 err ours / err transformers"] = {
        n: float((a - e).norm() / e.norm()) / max(float((b - e).norm() / e.norm()), 1e-300)
        for n, a, b, e in zip(names, ours, hf, exact)}
    return result


def _model_case(device: str) -> dict:
    """The tiny model (fp32; a dense and a MoE layer, and the MTP block) on one packed row of two samples, once with
    transformers' ops and once with every fused kernel of the toolkit (MLA assembly, SwiGLU MLPs, MoE routing):
    the largest relative difference of the loss and of any gradient, and the MLA kernel's launches."""
    from posttrain import routed_experts, swiglu
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP
    from posttrain.presets import preset_config
    from posttrain.sft.attention import default_attn_implementation, register_segmented_sdpa

    torch.manual_seed(0)
    cfg = preset_config("tiny")
    model = DeepseekV3ForCausalLMWithMTP(cfg).to(device)
    attn = default_attn_implementation(torch.device(device).type)
    if attn == "sdpa_segmented":
        register_segmented_sdpa()
    model.set_attn_implementation(attn)
    ids = torch.randint(0, cfg.vocab_size, (1, 96)).to(device)
    positions = torch.cat([torch.arange(40), torch.arange(56)]).view(1, -1).to(device)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
        loss = out.loss + 0.3 * out.mtp_loss  # the SFT trainer's loss (report eq. 25, λ = 0.3)
        loss.backward()
        return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    saved = {mod: mod.FUSED_DEVICE_TYPES for mod in (M, swiglu, routed_experts)}
    for mod in saved:
        mod.FUSED_DEVICE_TYPES = ()  # transformers' ops everywhere
    try:
        loss0, grads0 = run()
    finally:
        for mod, types in saved.items():
            mod.FUSED_DEVICE_TYPES = types
    swiglu.FUSED_DEVICE_TYPES = routed_experts.FUSED_DEVICE_TYPES = M.FUSED_DEVICE_TYPES
    try:
        with _launches() as launches:
            loss1, grads1 = run()
    finally:
        for mod, types in saved.items():
            mod.FUSED_DEVICE_TYPES = types
    return {"loss rel diff": float((loss1 - loss0).abs() / loss0.abs()),
            "max grad rel diff": max(float((grads1[n] - g).norm() / g.norm()) for n, g in grads0.items() if g.norm() > 0),
            "same gradients": sorted(grads0) == sorted(grads1), "launches": list(launches)}


def run_cases(device: str) -> dict:
    M._checked.clear()
    key = device_key(device)  # cuda:0 on CUDA, as the layer's tensors name it
    M._checked[key] = M._start_up_check(torch.device(key))
    results = {"start-up check": M._checked[key]}
    for name, args in {
        "bf16, V3 head dims, 5 heads, 2 rows": (2, 7, 5, 128, 64, 128, torch.bfloat16, 0),
        "fp32, small head dims, 3 heads": (1, 9, 3, 16, 8, 12, torch.float32, 1),
        "bf16, 17 heads (more than one head block each way)": (1, 3, 17, 128, 64, 128, torch.bfloat16, 2),
        "bf16, rope 12 (a partial block of pairs), nope 20": (1, 4, 2, 20, 12, 24, torch.bfloat16, 3),
    }.items():
        results[name] = _kernel_case(device, *args)
    results["layer, q_lora_rank 24"] = _layer_case(device, 24)
    results["layer, no q_lora (q_proj)"] = _layer_case(device, None)
    results["model"] = _model_case(device)
    return results


def _assert_cases(results: dict) -> None:
    results = dict(results)
    assert results.pop("start-up check") is None
    model = results.pop("model")
    # all three attention blocks (two layers, the MTP block) through the kernels, forward and backward
    assert model["launches"] == ["forward"] * 3 + ["backward"] * 3, model
    # fp32 through every fused kernel: the same model to fp32 rounding (the kernels order their fp32 operations
    # differently; a wrong index, sign or weight is O(1) off)
    assert model["same gradients"] and model["loss rel diff"] <= 1e-6 and model["max grad rel diff"] <= 1e-5, model
    for name in [n for n in results if n.startswith("layer")]:
        r = results.pop(name)
        assert r["launches"] == ["forward", "backward"], (name, r)
        # two fp32 computations of one layer: the attention inputs differ in the last bit at most (the rotary
        # part's order of operations); what follows is the same ops
        assert r["fp32 max rel diff"] <= 1e-5, (name, r)
        for grad, ratio in r["bf16 err ours / err transformers"].items():
            # ours rounds the rotary part once where eager rounds each op; the rest is the same bf16 ops. A wrong
            # sign or index is O(1) off; 1.25 leaves room for the two paths' roundings landing differently
            assert ratio <= 1.25, (name, grad, r)
    for name, r in results.items():
        for result in ("query", "key", "d q", "d kv", "d k_rope"):
            assert r[result] <= 1.0, (name, result, r)
        assert r["copies exact"] and r["d latent part zero"] and r["value is a view of kv"], (name, r)
        assert r["unused value: zero gradient"] and len(r["dtypes"]) == 1, (name, r)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_in_triton_interpreter(__file__)


def test_the_kernels_are_within_their_fp32_bounds_and_the_layer_is_transformers_in_the_interpreter(interpreted):
    """Query, key and the three gradients within their bounds of float64 rounded once (V3's head dims, head counts
    that need several head blocks or a partial one, a partial block of rotary pairs, strided gradients, rows of
    very different scales); copies exact; v a view of kv; the layer through the kernels is transformers' layer
    (fp32 to 1e-5; bf16 as close to float64 as transformers' own); the tiny model in fp32 through every fused
    kernel of the toolkit is the eager model to fp32 rounding; the start-up check passes."""
    _assert_cases(interpreted)


@pytest.mark.gpu
def test_the_kernels_on_cuda():
    _assert_cases(run_cases("cuda"))


@pytest.mark.gpu
def test_on_cuda_flex_attention_keeps_the_query_layout_so_no_copy_reaches_o_proj():
    """The kernels write query and key as [B, S, heads, dim] (transposed views): flex_attention's compiled kernel
    then writes its output, and the query's and key's gradients, in that order (torch's lowering infers them
    from the query's and key's strides), so transformers' `.transpose(1, 2).contiguous()` copies nothing and
    the backward kernel reads the gradients in place."""
    from torch.nn.attention.flex_attention import flex_attention

    b, s, heads, d = 1, 256, 4, 192
    q, k = (torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
            for _ in range(2))
    v = torch.randn(b, s, heads, 256, device="cuda", dtype=torch.bfloat16)[..., 128:].transpose(1, 2).requires_grad_(True)
    out = torch.compile(flex_attention)(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    dq, dk, _ = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.transpose(1, 2).is_contiguous() and dk.transpose(1, 2).is_contiguous()


def test_the_kernels_compile_for_the_h100_with_vector_loads_and_stores():
    """Both kernels compile for sm_90 (tests/triton_ptx.py) and move the head rows (the nope parts, v) in vectors."""
    import re

    if M.triton is None:
        pytest.skip("Triton is not installed")
    from triton_ptx import h100_ptx

    dims = dict(DN=128, DR=64, DV=128, BN=128, BR=32, OUT_BF16=True)
    configs = {
        "forward": (M._query_key_kernel, {n: "bf16" for n in ("q_ptr", "kv_ptr", "kr_ptr", "cos_ptr", "sin_ptr",
                                                               "query_ptr", "key_ptr")}, dict(dims, BH=8)),
        "backward": (M._query_key_backward_kernel, {n: "bf16" for n in ("dq_ptr", "dk_ptr", "dv_ptr", "cos_ptr", "sin_ptr",
                                                                        "d_q_ptr", "d_kv_ptr", "d_kr_ptr")},
                     dict(dims, BH=4, BV=128)),
    }
    for name, (kernel, pointers, constexprs) in configs.items():
        ptx = h100_ptx(kernel, pointers, constexprs)
        assert re.search(r"ld\.global(\.\w+)*\.v[24]", ptx), name
        assert re.search(r"st\.global(\.\w+)*\.v[24]", ptx), name


# -- where the kernels run ---------------------------------------------------------------------------------
def test_every_attention_of_the_model_is_the_fused_class_keeping_its_parameters(tmp_path):
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP
    from posttrain.presets import preset_config

    model = DeepseekV3ForCausalLMWithMTP(preset_config("tiny"))
    attentions = [m for m in model.modules() if isinstance(m, DeepseekV3Attention)]
    assert attentions and all(type(m) is M.DeepseekV3FusedAttention for m in attentions)
    assert len(attentions) == model.config.num_hidden_layers + model.config.num_nextn_predict_layers  # MTP's too
    plain = _attention(_config(), "cpu", torch.float32)
    keys = set(plain.state_dict())
    params = dict(plain.named_parameters())
    assert M.use_fused_mla(plain) == 1 and M.use_fused_mla(plain) == 0
    assert set(plain.state_dict()) == keys and all(p is params[n] for n, p in plain.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_cpu_it_is_transformers_forward_bit_for_bit(dtype):
    cfg = _config()
    mod = _attention(cfg, "cpu", dtype)
    x, pos, gy = _inputs(cfg, "cpu", dtype)
    hf = _layer_run(mod, DeepseekV3Attention.forward, x, pos, gy)
    M.use_fused_mla(mod)
    ours = _layer_run(mod, type(mod).forward, x, pos, gy)
    assert all(torch.equal(a, b) for a, b in zip(ours, hf))


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_the_fused_forward_is_transformers_layer_around_the_assembly(monkeypatch, q_lora_rank):
    """The fused path's own forward (projections, norm, split, attention, output projection) with the eager
    assembly in place of the kernels gives transformers' output and gradients bit for bit in fp32."""
    cfg = _config(q_lora_rank)
    mod = _attention(cfg, "cpu", torch.float32)
    x, pos, gy = _inputs(cfg, "cpu", torch.float32)
    hf = _layer_run(mod, DeepseekV3Attention.forward, x, pos, gy)
    M.use_fused_mla(mod)
    monkeypatch.setattr(M, "fused_mla_usable", lambda *a: True)
    monkeypatch.setattr(M, "mla_query_key_value", M.mla_query_key_value_reference)
    ours = _layer_run(mod, M.DeepseekV3FusedAttention.forward, x, pos, gy)
    assert all(torch.equal(a, b) for a, b in zip(ours, hf))


def test_kernels_run_only_on_cuda_without_a_cache_not_compiling_and_not_switched_off(monkeypatch):
    if M.triton is None:
        pytest.skip("Triton is not installed")
    cfg = _config()
    mod = _attention(cfg, "cpu", torch.bfloat16)
    x, pos, _ = _inputs(cfg, "cpu", torch.bfloat16)
    monkeypatch.setattr(M, "_checked", {"cpu": None})  # as if the check had passed on this device
    assert not M.fused_mla_usable(mod, x, pos, None)  # the CPU is not a fused device
    monkeypatch.setattr(M, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    assert M.fused_mla_usable(mod, x, pos, None)
    assert not M.fused_mla_usable(mod, x, pos, object())  # generation: a KV cache
    assert not M.fused_mla_usable(mod, x[:, :5], pos, None)  # cos/sin not one per token
    monkeypatch.setenv(M.FUSED_MLA_ENV, "0")
    assert not M.fused_mla_usable(mod, x, pos, None)
    monkeypatch.delenv(M.FUSED_MLA_ENV)
    monkeypatch.setattr(mod.config, "rope_interleave", False)  # rotate_half's layout, not V3's
    assert not M.fused_mla_usable(mod, x, pos, None)
    monkeypatch.setattr(mod.config, "rope_interleave", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not M.fused_mla_usable(mod, x, pos, None)


def test_a_failed_start_up_check_keeps_transformers_forward_with_one_warning(monkeypatch, caplog):
    calls = break_kernel(monkeypatch, M, "query_key_forward")
    cfg = _config()
    mod = _attention(cfg, "cpu", torch.float32)
    x, pos, gy = _inputs(cfg, "cpu", torch.float32)
    hf = _layer_run(mod, DeepseekV3Attention.forward, x, pos, gy)
    M.use_fused_mla(mod)
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        ours = _layer_run(mod, M.DeepseekV3FusedAttention.forward, x, pos, gy)
        assert not M.fused_mla_usable(mod, x, pos, None)
    assert_start_up_check_failed_once(M, calls, caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(ours, hf))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the tests in this file do)")
    M.FUSED_DEVICE_TYPES = ("cuda", "cpu")  # the kernels on CPU tensors, interpreted
    print(json.dumps(run_cases("cpu")))
