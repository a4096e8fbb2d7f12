"""posttrain/modeling.py: the V3 model with trainable MTP modules, as transformers runs it."""

from __future__ import annotations

import pytest
import torch

from posttrain.modeling import DeepseekV3ForCausalLMWithMTP
from posttrain.routed_experts import EXPERTS_IMPLEMENTATION as FUSED_EXPERTS


def _loss_and_grads(model: DeepseekV3ForCausalLMWithMTP, ids: torch.Tensor, positions: torch.Tensor):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, position_ids=positions, use_cache=False)
    (out.loss + 0.3 * out.mtp_loss).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_experts_run_transformers_grouped_mm_kernel_by_default_and_match_eager(tiny_model_dir):
    """transformers picks its experts kernel per class by grepping the class's source for
    `@use_experts_implementation` (5.x); our subclass declares support so that it runs grouped_mm,
    as transformers' own DeepseekV3ForCausalLM does, not the per-expert Python loop (11% slower
    per SFT step on the small preset on CPU, far more on GPU). The default `grouped_mm` becomes
    `posttrain_grouped`, which on a CPU is transformers' grouped_mm function itself (bit for bit) and
    on CUDA adds the fused dispatch/combine (tests/test_routed_experts.py). The kernels agree with the
    per-expert loop on the loss, the MTP loss and every gradient, on packed rows."""
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.config._experts_implementation == FUSED_EXPERTS
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 96), generator=g)
    positions = torch.cat([torch.arange(40), torch.arange(56)]).repeat(2, 1)  # two samples per row
    loss, grads = _loss_and_grads(model, ids, positions)
    model.set_experts_implementation("grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"
    hf_loss, hf_grads = _loss_and_grads(model, ids, positions)
    assert torch.equal(loss, hf_loss) and all(torch.equal(grads[n], hf_grads[n]) for n in grads)
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"
    eager_loss, eager_grads = _loss_and_grads(model, ids, positions)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    assert any(".mlp.experts." in n for n in grads) and any(f"layers.{model.config.num_hidden_layers}." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# -- F4: one dtype for q, k, v at the attention kernel under autocast --------------------------------

def _record_kernel_dtypes(monkeypatch, impl: str) -> list[tuple[torch.dtype, ...]]:
    """Records the (q, k, v) dtypes the kernel itself receives: for flex, transformers' compiled flex
    call (stubbed: flex compiles on its first call and has no CPU backward); for the segmented SDPA,
    every SDPA call."""
    seen: list[tuple[torch.dtype, ...]] = []
    if impl == "flex_attention":
        import transformers.integrations.flex_attention as flex

        def kernel(query, key, value, **kwargs):
            seen.append((query.dtype, key.dtype, value.dtype))
            return torch.zeros(*query.shape[:-1], value.shape[-1], dtype=query.dtype)

        monkeypatch.setattr(flex, "compile_friendly_flex_attention", kernel)
    else:
        from posttrain.sft.attention import register_segmented_sdpa

        register_segmented_sdpa()
        real = torch.nn.functional.scaled_dot_product_attention

        def kernel(query, key, value, *args, **kwargs):
            seen.append((query.dtype, key.dtype, value.dtype))
            return real(query, key, value, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", kernel)
    return seen


@pytest.mark.parametrize("impl", ["flex_attention", "sdpa_segmented"])
def test_attention_kernel_gets_q_k_v_in_one_dtype_under_autocast(tiny_model_dir, monkeypatch, impl):
    """fp32 master weights + bf16 autocast: MLA builds Q from the fp32 rotary (cos/sin follow the fp32
    hidden states) and K, V from bf16 projections. SDPA's autocast rule casts all three; flex_attention
    (the CUDA default) must be given them in the autocast dtype, or it runs in fp32 / rejects them.
    Without autocast the dtypes are left as they are."""
    seen = _record_kernel_dtypes(monkeypatch, impl)
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                         attn_implementation=impl).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids, position_ids=positions, use_cache=False)
    assert seen, "the attention kernel was not called"
    assert set(seen) == {(torch.bfloat16,) * 3}, sorted(set(seen), key=str)
    seen.clear()
    model(input_ids=ids, labels=ids, position_ids=positions, use_cache=False)  # no autocast: fp32 throughout
    assert set(seen) == {(torch.float32,) * 3}


# -- the model against DeepSeek-V3's own inference formulas ---------------------------------------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _deepseek_reference(sd: dict, c: dict, ids: torch.Tensor, pos: torch.Tensor):
    """Logits of the main head and of each MTP depth, in float64, written from DeepSeek-V3's inference code
    (inference/model.py: YaRN `precompute_freqs_cis` in fp32 as there, complex-pair RoPE on the interleaved
    rope dims, softmax scale times mscale², the sigmoid gate with group-limited top-k on the biased scores
    and weights from the unbiased ones) and vLLM's deepseek_mtp for the MTP module ([enorm(emb); hnorm(h)],
    h the main model's normed output, embedding zeroed at a sample's first position). Samples are found as
    positions restarting at 0."""
    import math

    import torch.nn.functional as F

    sd = {k: v.double() for k, v in sd.items()}
    eps, heads, dn, dr, dv = c["rms_norm_eps"], c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    rs, base = c["rope_scaling"], c["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, dr, 2, dtype=torch.float32) / dr))
    corr = lambda rot: dr * math.log(rs["original_max_position_embeddings"] / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low, high = max(math.floor(corr(rs["beta_fast"])), 0), min(math.ceil(corr(rs["beta_slow"])), dr - 1)
    smooth = 1 - ((torch.arange(dr // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freqs = freqs / rs["factor"] * (1 - smooth) + freqs * smooth
    angles = pos.float()[..., None] * freqs
    cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex128).unsqueeze(2)  # [B, S, 1, dr/2]
    rope = lambda x: torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * cis).flatten(-2)  # noqa: E731
    scale = (dn + dr) ** -0.5 * (0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0) ** 2
    sample = torch.cumsum((pos == 0).long(), -1)
    seq = pos.shape[1]
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril() & (sample[:, :, None] == sample[:, None, :])
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[:, :, None, :]
    b, s = ids.shape

    def mlp(p, x):
        return (F.silu(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T)) @ sd[p + "down_proj.weight"].T

    def block(i, x):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        a = p + "self_attn."
        q = _rms(h @ sd[a + "q_a_proj.weight"].T, sd[a + "q_a_layernorm.weight"], 1e-6) @ sd[a + "q_b_proj.weight"].T
        q_nope, q_pe = q.view(b, s, heads, dn + dr).split([dn, dr], -1)
        latent, k_pe = (h @ sd[a + "kv_a_proj_with_mqa.weight"].T).split([c["kv_lora_rank"], dr], -1)
        kv = (_rms(latent, sd[a + "kv_a_layernorm.weight"], 1e-6) @ sd[a + "kv_b_proj.weight"].T).view(b, s, heads, dn + dv)
        k_nope, v = kv.split([dn, dv], -1)
        query = torch.cat([q_nope, rope(q_pe)], -1)
        key = torch.cat([k_nope, rope(k_pe.unsqueeze(2)).expand(-1, -1, heads, -1)], -1)
        att = (torch.einsum("bshd,bthd->bsht", query, key) * scale + bias).softmax(-1)
        x = x + torch.einsum("bsht,bthd->bshd", att, v).reshape(b, s, -1) @ sd[a + "o_proj.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps).reshape(b * s, -1)
        if i < c["first_k_dense_replace"]:
            return x + mlp(p + "mlp.", h).view(x.shape)
        g = p + "mlp.gate."
        scores = (h @ sd[g + "weight"].T).sigmoid()
        biased = (scores + sd[g + "e_score_correction_bias"]).view(b * s, c["n_group"], -1)
        groups = biased.topk(2, dim=-1)[0].sum(-1).topk(c["topk_group"], dim=-1)[1]
        dropped = torch.ones(b * s, c["n_group"], dtype=torch.bool).scatter_(1, groups, False)
        chosen = biased.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1).topk(c["num_experts_per_tok"], -1)[1]
        weights = scores.gather(1, chosen)
        weights = weights / weights.sum(-1, keepdim=True) * c["routed_scaling_factor"]
        every = torch.stack([mlp(f"{p}mlp.experts.{e}.", h) for e in range(c["n_routed_experts"])], 1)  # [T, E, H]
        routed = (weights.unsqueeze(-1) * every.gather(1, chosen.unsqueeze(-1).expand(-1, -1, h.shape[-1]))).sum(1)
        return x + (routed + mlp(p + "mlp.shared_experts.", h)).view(x.shape)

    embed, head = sd["model.embed_tokens.weight"], sd["lm_head.weight"]
    x = embed[ids]
    for i in range(c["num_hidden_layers"]):
        x = block(i, x)
    prev = _rms(x, sd["model.norm.weight"], eps)
    logits, mtp = prev @ head.T, []
    for k in range(1, c["num_nextn_predict_layers"] + 1):
        p = f"model.layers.{c['num_hidden_layers'] + k - 1}."
        nxt, nxt_sample = torch.zeros_like(ids), torch.full_like(sample, -1)
        nxt[:, : s - k], nxt_sample[:, : s - k] = ids[:, k:], sample[:, k:]
        emb = embed[nxt] * ((nxt_sample == sample) & (pos != 0)).unsqueeze(-1)
        x = torch.cat([_rms(emb, sd[p + "enorm.weight"], eps), _rms(prev, sd[p + "hnorm.weight"], eps)], -1) @ sd[p + "eh_proj.weight"].T
        prev = block(c["num_hidden_layers"] + k - 1, x)
        mtp.append(_rms(prev, sd[p + "shared_head.norm.weight"], eps) @ head.T)
    return logits, mtp


def test_logits_match_deepseek_reference_with_yarn_group_limited_routing_and_mtp(tmp_path):
    """V3's YaRN rope_scaling (factor 40, mscale_all_dim 1) and group-limited routing (n_group > 1, drifted
    correction biases) on packed rows: this model, and transformers' DeepseekV3ForCausalLM loading its
    checkpoint, give the logits of DeepSeek's own formulas. In float64 but for transformers' fp32 rotary angles,
    RMSNorm and router (2^-24 relative each): 1e-5 on logits of about 5; a wrong mscale, rotated half, bias in
    the gate weights or routing group moves them by 1e-1 and more."""
    from safetensors.torch import load_file
    from transformers import DeepseekV3ForCausalLM

    from posttrain.presets import TINY, preset_config

    rope_scaling = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    fields = {**TINY, "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
              "num_hidden_layers": 3, "n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4,
              "q_lora_rank": 48, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 24,
              "max_position_embeddings": 163840, "num_nextn_predict_layers": 2, "rope_scaling": rope_scaling}
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLMWithMTP(preset_config("tiny", **fields)).double().eval()
    model.set_experts_implementation("eager")  # grouped_mm has no float64
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.2 * torch.randn_like(buf))
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.stack([torch.arange(12) + 3000, torch.cat([torch.arange(7), torch.arange(5)])])
    want, want_mtp = _deepseek_reference(load_file(tmp_path / "model.safetensors"), fields, ids, pos)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, use_cache=False, compute_mtp=True)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, experts_implementation="eager").eval()
        hf_logits = hf(input_ids=ids, position_ids=pos, use_cache=False).logits
    for got, ref in [(out.logits, want), (hf_logits, want), *zip(out.mtp_logits, want_mtp)]:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
