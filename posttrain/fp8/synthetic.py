"""Synthetic DeepSeek-layout checkpoints (random weights, real names/dtypes/sharding) for tests and benchmarks.

Shapes follow V3's structure at any width: MLA (``q_a_proj``, ``q_b_proj``,
``kv_a_proj_with_mqa`` with its 576-row latent, ``kv_b_proj``, ``o_proj``), a dense first
layer, MoE layers (bf16 router ``mlp.gate.weight``, fp32 ``e_score_correction_bias``,
routed and shared experts), bf16 embeddings / norms / ``lm_head``.

With ``fp8=True`` the FP8 tensors hold random e4m3 bit patterns (NaN codes excluded)
and random scales that are *not* ``amax / 448`` -- like DeepSeek's released scales, so a
round trip cannot pass by re-deriving them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .layout import INDEX_FILE, fp8_quantization_config, is_fp8_weight_name, scale_name_for
from .quant import FP8_DTYPE, quantize_blockwise, scale_grid_shape

__all__ = ["synthetic_tensor_specs", "write_synthetic_checkpoint"]


def synthetic_tensor_specs(
    *,
    num_layers: int = 2,
    hidden: int = 256,
    intermediate: int = 384,
    moe_intermediate: int = 130,
    n_experts: int = 4,
    q_lora_rank: int = 96,
    kv_lora_rank: int = 512,
    rope_dim: int = 64,
    heads: int = 2,
    nope_dim: int = 32,
    v_dim: int = 32,
    vocab: int = 320,
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every high-precision tensor, in checkpoint order."""
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_a_proj.weight", (q_lora_rank, hidden)),
            (f"{p}.self_attn.q_a_layernorm.weight", (q_lora_rank,)),
            (f"{p}.self_attn.q_b_proj.weight", (heads * (nope_dim + rope_dim), q_lora_rank)),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (kv_lora_rank + rope_dim, hidden)),
            (f"{p}.self_attn.kv_a_layernorm.weight", (kv_lora_rank,)),
            (f"{p}.self_attn.kv_b_proj.weight", (heads * (nope_dim + v_dim), kv_lora_rank)),
            (f"{p}.self_attn.o_proj.weight", (hidden, heads * v_dim)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
        if i == 0:
            specs += [
                (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
                (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
                (f"{p}.mlp.down_proj.weight", (hidden, intermediate)),
            ]
            continue
        specs += [(f"{p}.mlp.gate.weight", (n_experts, hidden)), (f"{p}.mlp.gate.e_score_correction_bias", (n_experts,))]
        for e in range(n_experts):
            specs += [
                (f"{p}.mlp.experts.{e}.gate_proj.weight", (moe_intermediate, hidden)),
                (f"{p}.mlp.experts.{e}.up_proj.weight", (moe_intermediate, hidden)),
                (f"{p}.mlp.experts.{e}.down_proj.weight", (hidden, moe_intermediate)),
            ]
        specs += [
            (f"{p}.mlp.shared_experts.gate_proj.weight", (moe_intermediate, hidden)),
            (f"{p}.mlp.shared_experts.up_proj.weight", (moe_intermediate, hidden)),
            (f"{p}.mlp.shared_experts.down_proj.weight", (hidden, moe_intermediate)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def _random_fp8(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    # 0x7F / 0xFF are e4m3fn's NaN codes: draw from the 254 other byte values.
    b = torch.randint(0, 254, shape, generator=g, dtype=torch.uint8)
    b += (b >= 0x7F).to(torch.uint8)
    return b.view(FP8_DTYPE)


def write_synthetic_checkpoint(
    out_dir: str | os.PathLike,
    *,
    fp8: bool = True,
    shard_bytes: int = 1 << 20,
    scale_in_next_shard: bool = True,
    scale_fmt: str | None = None,
    seed: int = 0,
    **spec_kwargs,
) -> Path:
    """Write a multi-shard checkpoint (+ index, config, a tokenizer stub) and return its directory.

    Shards are filled greedily up to ``shard_bytes``. With ``scale_in_next_shard`` the first
    FP8 weight's scale is stored in the following shard (DeepSeek's release has such splits).
    ``fp8=False`` writes bf16 Linear weights (a BF16 checkpoint for the bf16 -> fp8 direction);
    ``scale_fmt`` then only matters for ``fp8=True`` with amax-derived ue8m0 scales.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors: list[tuple[str, torch.Tensor]] = []
    specs = synthetic_tensor_specs(**spec_kwargs)
    for name, shape in specs:
        if name.endswith("e_score_correction_bias"):
            tensors.append((name, torch.randn(shape, generator=g)))
        elif fp8 and is_fp8_weight_name(name):
            if scale_fmt == "ue8m0":
                w = torch.randn(shape, generator=g) * 0.02
                q, s = quantize_blockwise(w, scale_fmt="ue8m0")
            else:
                q = _random_fp8(shape, g)
                s = torch.rand(scale_grid_shape(shape), generator=g) * 1e-3 + 1e-6
            tensors += [(name, q), (scale_name_for(name), s)]
        else:
            tensors.append((name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)))

    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    if fp8 and scale_in_next_shard and len(shards) > 1:
        for i, shard in enumerate(shards[:-1]):
            moved = next(((n, t) for n, t in shard if n.endswith("_scale_inv")), None)
            if moved is not None:
                shard.remove(moved)
                shards[i + 1].append(moved)
                break

    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(dict(shard), str(out / fname), metadata={"format": "pt"})
        for name, t in shard:
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16"}
    if fp8:
        config["quantization_config"] = fp8_quantization_config(scale_fmt=scale_fmt)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return out
