"""Which tensors of a DeepSeek-layout checkpoint are FP8, and how the files are laid out.

What the real DeepSeek-V3 checkpoint and vLLM agree on (checked against vLLM 0.32's
``deepseek_v2.py`` / ``deepseek_mtp.py`` / ``quantization/fp8.py``):

* FP8 (``float8_e4m3fn`` + float32 ``weight_scale_inv``): every Linear of attention
  (``q_proj`` or ``q_a_proj``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``,
  ``o_proj``), of the dense MLP, of the shared experts and of every routed expert
  (``gate_proj``/``up_proj``/``down_proj``) -- vLLM builds these as ``LinearBase`` /
  fused-MoE layers that take ``quant_config``. This includes the decoder block inside
  each MTP module (``model.layers.{num_hidden_layers + k}``).
* High precision: ``embed_tokens``, ``lm_head``, all norms, the router weight
  ``mlp.gate.weight`` (vLLM's ``GateLinear``, no quant config) and its fp32
  ``e_score_correction_bias``; in the MTP module ``eh_proj`` (a plain ``nn.Linear`` in
  vLLM) and ``shared_head.head`` (``ParallelLMHead``; the fp8 config quantizes no
  embedding/LM-head) and ``enorm``/``hnorm``/``shared_head.norm``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
SCALE_SUFFIX = "_scale_inv"

_ATTN = r"self_attn\.(?:q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
_FFN = r"mlp\.(?:shared_experts\.|experts\.\d+\.)?(?:gate_proj|up_proj|down_proj)"
FP8_WEIGHT_PATTERN = re.compile(rf"(?:^|\.)(?:{_ATTN}|{_FFN})\.weight$")


def fp8_linear_shapes(config) -> list[tuple[str, int, int]]:
    """(layer, out_features N, in_features K) of each distinct FP8 Linear of a V3-architecture config, in
    the order of a decoder block: MLA's projections (report §2.1.1), then a routed expert's and the dense
    MLP's gate|up and down. For DeepSeek-V3 these are issue #13's nine benchmark shapes."""
    heads, nope, rope, v = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                            config.v_head_dim)
    hidden, q_lora, kv_lora = config.hidden_size, config.q_lora_rank, config.kv_lora_rank
    q = [("q_a_proj", q_lora, hidden), ("q_b_proj", heads * (nope + rope), q_lora)] if q_lora else \
        [("q_proj", heads * (nope + rope), hidden)]
    return q + [
        ("kv_a_proj_with_mqa", kv_lora + rope, hidden),
        ("kv_b_proj", heads * (nope + v), kv_lora),
        ("o_proj", hidden, heads * v),
        ("expert gate|up", config.moe_intermediate_size, hidden),
        ("expert down", hidden, config.moe_intermediate_size),
        ("dense gate|up", config.intermediate_size, hidden),
        ("dense down", hidden, config.intermediate_size),
    ]


def is_fp8_weight_name(name: str) -> bool:
    """True for the DeepSeek-layout tensors that are stored in FP8 (see module docstring)."""
    return FP8_WEIGHT_PATTERN.search(name) is not None


def scale_name_for(weight_name: str) -> str:
    """``x.weight`` -> ``x.weight_scale_inv`` (the DeepSeek name)."""
    return weight_name + SCALE_SUFFIX


def is_scale_name(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def fp8_quantization_config(block: tuple[int, int] = (128, 128), scale_fmt: str | None = None) -> dict:
    """The ``quantization_config`` of a DeepSeek-V3 FP8 checkpoint (V3.1 adds ``scale_fmt: ue8m0``)."""
    cfg = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [int(block[0]), int(block[1])],
    }
    if scale_fmt is not None:
        cfg["scale_fmt"] = scale_fmt
    return cfg


def block_size_from_config(config: dict) -> tuple[int, int]:
    qc = config.get("quantization_config") or {}
    if qc and qc.get("quant_method") != "fp8":
        raise ValueError(f"unsupported quant_method {qc.get('quant_method')!r}; only DeepSeek 'fp8' is handled")
    block = qc.get("weight_block_size") or [128, 128]
    return int(block[0]), int(block[1])


def scale_fmt_from_config(config: dict) -> str | None:
    return (config.get("quantization_config") or {}).get("scale_fmt")


@dataclass
class ShardedLayout:
    """The safetensors files of a checkpoint: ``weight_map`` (tensor -> file) and the index metadata.

    ``indexed`` is False for a single ``model.safetensors`` without an index.
    """

    weight_map: dict[str, str]
    metadata: dict = field(default_factory=dict)
    indexed: bool = True

    def shards(self) -> list[str]:
        """Shard file names, sorted (the ``-0000k-of-0000n`` names sort in order)."""
        return sorted(set(self.weight_map.values()))

    def by_shard(self) -> dict[str, list[str]]:
        """Tensor names per shard file, in weight-map order."""
        groups: dict[str, list[str]] = {}
        for k, f in self.weight_map.items():
            groups.setdefault(f, []).append(k)
        return groups


def read_layout(ckpt_dir: str | os.PathLike) -> ShardedLayout:
    """Read ``model.safetensors.index.json`` (or list the single ``model.safetensors``)."""
    d = Path(ckpt_dir)
    index = d / INDEX_FILE
    if index.exists():
        data = json.loads(index.read_text())
        return ShardedLayout(dict(data["weight_map"]), dict(data.get("metadata", {})), True)
    single = d / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {d}")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        keys = list(f.keys())
    return ShardedLayout({k: SINGLE_FILE for k in keys}, {}, False)


def write_index(dst_dir: str | os.PathLike, weight_map: dict[str, str], total_size: int, extra_metadata: dict) -> None:
    meta = {k: v for k, v in extra_metadata.items() if k != "total_size"}
    meta["total_size"] = int(total_size)
    ordered = dict(sorted(weight_map.items()))
    data = {"metadata": meta, "weight_map": ordered}
    (Path(dst_dir) / INDEX_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    p = Path(ckpt_dir) / CONFIG_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def write_config(dst_dir: str | os.PathLike, config: dict) -> None:
    (Path(dst_dir) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")


def copy_side_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the top-level non-weight files (tokenizer, generation_config, code, README ...).

    Skips safetensors shards, the index and ``config.json`` (the caller writes those).
    """
    import shutil

    src, dst = Path(src_dir), Path(dst_dir)
    if src.resolve() == dst.resolve():
        return []
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in (INDEX_FILE, CONFIG_FILE) or p.suffix == ".safetensors":
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied
