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

PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY, "small": SMALL, "deepseek-v3": DEEPSEEK_V3}


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
