"""The one converter between a live model's tensors and the DeepSeek checkpoint layout.

transformers v5 holds routed experts fused (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]); DeepSeek checkpoints, vLLM and `save_pretrained` use per-expert names
(`mlp.experts.{i}.gate_proj.weight`, …). Live → DeepSeek goes through transformers' own
`revert_weight_conversion` (what `save_pretrained` calls), so the names and values are exactly what
a saved checkpoint holds. DeepSeek → live is the inverse fusion. Both carry the MTP layers and the
router's `e_score_correction_bias` buffers, which live in the state dict like any other tensor.

Weight sync streams the same layout into a rollout engine (`weights_for_engine`): plain, or with every
FP8-format weight re-quantized per the engine's block size and scale format and followed by its
`weight_scale_inv`, when the engine serves a DeepSeek FP8 checkpoint in FP8.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from .distributed import full_tensors

_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<idx>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def to_deepseek_layout(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Live (fused) tensors → DeepSeek checkpoint names, as `save_pretrained` writes them.

    `state_dict` may be any subset of the model's state (e.g. one layer); by default the whole
    state, buffers included. Returned tensors may be views of the live ones.
    """
    if state_dict is None:
        state_dict = model.state_dict()
    return revert_weight_conversion(model, dict(state_dict))


def layer_group(name: str) -> str:
    """The decoder layer a tensor belongs to ("0", "1", ...; MTP layers after the main ones), or "_top"
    (embedding, final norm, head): the unit in which weights are streamed (sync, resume)."""
    m = _LAYER_KEY.match(name)
    return m.group(1) if m else "_top"


def layer_group_order(group: str) -> tuple[bool, int]:
    """Sort key of `layer_group`s: "_top" first, then the layers in order."""
    return (group != "_top", int(group) if group.isdigit() else -1)


def iter_deepseek_layout(model: nn.Module, detach: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams the DeepSeek-layout tensors one decoder layer at a time (weight sync to vLLM), so
    that at most one layer's converted (and, under FSDP2, gathered) copy exists at once."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        groups.setdefault(layer_group(name), {})[name] = tensor.detach() if detach else tensor
    for key in sorted(groups, key=layer_group_order):
        # Under FSDP2 each layer is all-gathered here, one at a time: every rank must consume the
        # generator to the end, in step with the others.
        yield from to_deepseek_layout(model, full_tensors(groups[key])).items()


def iter_fp8_deepseek_layout(
    model: nn.Module, block: tuple[int, int] = (128, 128), scale_fmt: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """`iter_deepseek_layout` with every FP8-format weight (attention, dense/shared/routed expert
    projections: `posttrain.fp8.layout.is_fp8_weight_name`) re-quantized to e4m3 per `block` and
    followed by its `weight_scale_inv` -- what a DeepSeek FP8 checkpoint holds (report §3.3.2)."""
    from .fp8.layout import is_fp8_weight_name, scale_name_for
    from .fp8.quant import quantize_blockwise

    for name, tensor in iter_deepseek_layout(model):
        if tensor.dim() == 2 and is_fp8_weight_name(name):
            q, s = quantize_blockwise(tensor, block, scale_fmt)
            yield name, q
            yield scale_name_for(name), s
        else:
            yield name, tensor


def weights_for_engine(model: nn.Module, engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """What `engine.sync_weights` takes for `model`: the DeepSeek layout, re-quantized per `engine.fp8_block`
    and `engine.fp8_scale_fmt` when the engine holds FP8 weights (`engines.vllm_engine.VLLMColocateEngine`)."""
    block = getattr(engine, "fp8_block", None)
    if block is None:
        return iter_deepseek_layout(model)
    return iter_fp8_deepseek_layout(model, block, getattr(engine, "fp8_scale_fmt", None))


def from_deepseek_layout(deepseek_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek checkpoint names → the live model's (fused) state-dict names."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in deepseek_state.items():
        m = _EXPERT_KEY.match(name)
        if m is None:
            out[name] = tensor
            continue
        experts.setdefault(m["prefix"], {}).setdefault(int(m["idx"]), {})[m["proj"]] = tensor
    for prefix, by_index in experts.items():
        n = len(by_index)
        if sorted(by_index) != list(range(n)):
            raise ValueError(f"{prefix}: expert indices are not 0..{n - 1}: {sorted(by_index)}")
        missing = [f"{prefix}.{i}.{p}" for i in range(n) for p in ("gate_proj", "up_proj", "down_proj") if p not in by_index[i]]
        if missing:
            raise ValueError(f"missing expert weights: {missing[:4]}{' …' if len(missing) > 4 else ''}")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([by_index[i]["gate_proj"], by_index[i]["up_proj"]], dim=0) for i in range(n)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([by_index[i]["down_proj"] for i in range(n)])
    return out
