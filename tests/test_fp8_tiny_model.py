"""End to end on the project's tiny V3 model: bf16/fp32 checkpoint -> FP8 -> back, through transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

modeling = pytest.importorskip("posttrain.modeling")
presets = pytest.importorskip("posttrain.presets")
layout = pytest.importorskip("posttrain.layout")

from posttrain.fp8.checkpoint import load_fp8_checkpoint, save_fp8_checkpoint  # noqa: E402
from posttrain.fp8.convert import convert_bf16_to_fp8, convert_fp8_to_bf16  # noqa: E402
from posttrain.fp8.layout import INDEX_FILE  # noqa: E402


def _dtypes(d: Path) -> dict[str, torch.dtype]:
    files = (
        set(json.loads((d / INDEX_FILE).read_text())["weight_map"].values())
        if (d / INDEX_FILE).exists()
        else {"model.safetensors"}
    )
    out = {}
    for shard in files:
        with safe_open(str(d / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k).dtype for k in f.keys()})
    return out


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_tiny_v3_fp8_checkpoint_dequantizes_to_the_same_model(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    config = presets.preset_config("tiny", vocab_size=256)
    torch.manual_seed(0)
    original = modeling.DeepseekV3ForCausalLMWithMTP(config).float()
    src = tmp_path / "fp32"
    original.save_pretrained(src)

    fp8_dir = tmp_path / "fp8"
    convert_bf16_to_fp8(src, fp8_dir, progress=False)
    dt = _dtypes(fp8_dir)
    n = config.num_hidden_layers  # the MTP module sits at model.layers.{n}
    fp8 = torch.float8_e4m3fn
    assert dt["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == fp8
    assert dt["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == torch.float32
    assert dt["model.layers.1.mlp.experts.7.down_proj.weight"] == fp8
    assert dt[f"model.layers.{n}.self_attn.o_proj.weight"] == fp8
    assert dt[f"model.layers.{n}.mlp.shared_experts.up_proj.weight"] == fp8
    for high in (f"model.layers.{n}.eh_proj.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight",
                 "model.embed_tokens.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):  # fmt: skip
        assert dt[high] == torch.float32, high

    # transformers reads the converted-back checkpoint with no hand edits ...
    back = tmp_path / "fp32-from-fp8"
    convert_fp8_to_bf16(fp8_dir, back, dtype=torch.float32, progress=False)
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    hf = DeepseekV3ForCausalLM.from_pretrained(back, dtype=torch.float32)

    # ... and its logits equal those of our model built from the dequantized FP8 state dict
    state, meta = load_fp8_checkpoint(fp8_dir, torch.float32)
    ours = modeling.DeepseekV3ForCausalLMWithMTP(config).float()
    ours.load_state_dict(layout.from_deepseek_layout(state), strict=True)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ours_logits, hf_logits = _logits(ours, ids), _logits(hf, ids)
    torch.testing.assert_close(ours_logits, hf_logits, rtol=0, atol=1e-6)
    # and stay near the unquantized model (weight-only e4m3 error)
    ref = _logits(original, ids)
    rel = float((ours_logits - ref).norm() / ref.norm())
    assert 0 < rel < 0.1, rel

    # saving the untouched dequantized model reproduces the FP8 checkpoint's tensors exactly
    live = layout.to_deepseek_layout(ours)
    save_fp8_checkpoint(live, meta, tmp_path / "resaved")
    for name in dt:
        with safe_open(str(fp8_dir / meta.layout.weight_map[name]), framework="pt") as a, safe_open(
            str(tmp_path / "resaved" / meta.layout.weight_map[name]), framework="pt"
        ) as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
