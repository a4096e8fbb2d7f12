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
