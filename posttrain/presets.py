"""Model presets: the embedded tiny default and the real DeepSeek-V3 (671B) configuration."""

from __future__ import annotations

from typing import Any

from transformers import DeepseekV3Config

# The real DeepSeek-V3 config.json (671B, 61 layers + 1 MTP module), as released.
DEEPSEEK_V3: dict[str, Any] = dict(
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_nextn_predict_layers=1,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    norm_topk_prob=True,
    hidden_act="silu",
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    rope_theta=10000,
    rope_scaling={
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    bos_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=False,
)

# The embedded default: the real architecture at laptop size. vLLM's CPU MLA kernel only runs a
# 576-wide latent, so kv_lora_rank=512 and qk_rope_head_dim=64 stay at their real values.
TINY: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_nextn_predict_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=96,
    qk_rope_head_dim=64,
    v_head_dim=32,
    qk_nope_head_dim=32,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    n_group=4,  # group-limited routing needs >= 2 experts per group
    topk_group=2,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    hidden_act="silu",
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=10000,
    initializer_range=0.02,
    tie_word_embeddings=False,
)

# A CPU-sized model with more depth and width, for benchmarks where the tiny one is too small to
# show engine differences.
SMALL: dict[str, Any] = {
    **TINY,
    "hidden_size": 256,
    "intermediate_size": 768,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_routed_experts": 16,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 4,
    "q_lora_rank": 192,
}

# A smaller public model of the V3 architecture (MLA, sigmoid noaux_tc routing, shared experts):
# moonshotai/Moonlight-16B-A3B, 16B parameters, 3B activated. No MTP module and no q-LoRA.
MOONLIGHT_16B: dict[str, Any] = dict(
    vocab_size=163840,
    hidden_size=2048,
    intermediate_size=11264,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_nextn_predict_layers=0,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    routed_scaling_factor=2.446,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    n_group=1,
    topk_group=1,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=50000,
    bos_token_id=163584,
    eos_token_id=163585,
    tie_word_embeddings=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    "small": SMALL,
    "moonlight-16b": MOONLIGHT_16B,
    "deepseek-v3": DEEPSEEK_V3,
}

# Public checkpoints whose architecture a preset reproduces (for meta-device checks of recipes).
MODEL_PRESETS: dict[str, str] = {
    "deepseek-ai/DeepSeek-V3": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3-Base": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3-0324": "deepseek-v3",
    "deepseek-ai/DeepSeek-R1": "deepseek-v3",
    "moonshotai/Moonlight-16B-A3B": "moonlight-16b",
    "moonshotai/Moonlight-16B-A3B-Instruct": "moonlight-16b",
}


def preset_for_model(name_or_path: str) -> str | None:
    """The preset with the architecture of a known public checkpoint name (None if unknown)."""
    return MODEL_PRESETS.get(str(name_or_path).rstrip("/"))


def preset_config(name: str, **overrides: Any) -> DeepseekV3Config:
    """Builds the `DeepseekV3Config` of a preset. `overrides` replace preset fields (e.g. vocab_size)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    if "rope_scaling" in fields:
        rs = dict(fields.pop("rope_scaling"))
        rs["rope_type"] = rs.pop("type", rs.get("rope_type", "yarn"))
        rs["rope_theta"] = fields.pop("rope_theta", 10000)
        fields["rope_parameters"] = rs
    elif "rope_theta" in fields:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    # topk_method / scoring_func are not DeepseekV3Config fields in transformers, but vLLM reads them
    # from config.json (it refuses e_score_correction_bias without noaux_tc + sigmoid).
    extra = {k: fields.pop(k) for k in ("topk_method", "scoring_func") if k in fields}
    config = DeepseekV3Config(**fields)
    for k, v in extra.items():
        setattr(config, k, v)
    return config
