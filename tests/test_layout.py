"""The layout converter: live (fused experts) <-> DeepSeek checkpoint names."""

from __future__ import annotations

import torch
from safetensors import safe_open

from posttrain.layout import from_deepseek_layout, iter_deepseek_layout, to_deepseek_layout
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP


def _perturbed_model(tiny_model_dir):
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # make every tensor distinct, buffers included
        for i, (_, t) in enumerate(sorted(model.state_dict().items())):
            t.add_(torch.randn_like(t.float()).to(t.dtype) * 0.01 + i * 1e-4)
    return model


def test_live_to_deepseek_to_live_is_identity(tiny_model_dir):
    model = _perturbed_model(tiny_model_dir)
    live = model.state_dict()
    back = from_deepseek_layout(to_deepseek_layout(model))
    assert set(back) == set(live)
    for k, v in live.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert any("e_score_correction_bias" in k for k in back)
    assert any(k.startswith("model.layers.2.eh_proj") for k in back)  # MTP


def test_names_and_values_match_save_pretrained(tiny_model_dir, tmp_path):
    model = _perturbed_model(tiny_model_dir)
    model.save_pretrained(tmp_path)
    ds = to_deepseek_layout(model)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
        assert saved == set(ds)
        for k in saved:
            assert torch.equal(f.get_tensor(k), ds[k]), k
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in ds
    # The streaming form (weight sync) yields the same tensors.
    streamed = dict(iter_deepseek_layout(model))
    assert set(streamed) == set(ds) and all(torch.equal(streamed[k], ds[k]) for k in ds)


def test_fusion_puts_each_expert_in_its_slot(tiny_model_dir):
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir)
    ds = to_deepseek_layout(model)
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    inter = model.config.moe_intermediate_size
    assert torch.equal(ds["model.layers.1.mlp.experts.5.gate_proj.weight"], fused[5, :inter])
    assert torch.equal(ds["model.layers.1.mlp.experts.5.up_proj.weight"], fused[5, inter:])
