"""FP8 for transformers' fused MoE experts (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]).

transformers holds DeepSeek-V3's routed experts as 3-D parameters used through
``grouped_mm``, not as ``nn.Linear``, so :class:`~posttrain.fp8.linear.FP8Linear` cannot
reach them. transformers dispatches the experts forward through its public
``ExpertsInterface`` registry (``integrations/moe.py``, selected by
``config._experts_implementation``); this module registers ``"posttrain_fp8"`` there.
Its forward is transformers' grouped flow (sort token-expert pairs by expert, up/gate
projection, activation, down projection, weighted sum) with both projections done by
:func:`fp8_grouped_linear`: the same §3.3 recipe as ``FP8Linear``, each expert's weight
quantized in its own 128x128 blocks (exactly the blocks of the per-expert DeepSeek
checkpoint tensors) and the wgrad token tiles never crossing an expert's segment.
"""

from __future__ import annotations

import torch
from torch import nn

from .gemm import TILE, BlockQuantized, fp8_gemm_nt
from .linear import (
    DEFAULT_RECIPE,
    FP8Recipe,
    fp8_dgrad_gemm,
    fp8_wgrad_gemm,
    quantize_act,
    quantize_weight,
)

__all__ = ["EXPERTS_IMPLEMENTATION", "fp8_grouped_linear", "fp8_experts_forward", "register_fp8_experts", "enable_fp8_experts"]

EXPERTS_IMPLEMENTATION = "posttrain_fp8"


def _segments(counts: tuple[int, ...]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class _FP8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: tuple[int, ...], recipe: FP8Recipe):
        n_out = weight.shape[-2]
        y = torch.zeros(x.shape[0], n_out, dtype=torch.float32, device=x.device)
        xq = quantize_act(x, recipe)  # 1x128 tiles are per row, so one call covers every expert
        wq = quantize_weight(weight, recipe)  # [E, ceil(N/128), ceil(K/128)] scales
        for e, s, t in _segments(counts):
            y[s:t] = fp8_gemm_nt(BlockQuantized(xq.data[s:t], xq.scale_inv[s:t], (1, TILE)), wq[e])
        ctx.counts, ctx.recipe = counts, recipe
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        if recipe.backward == "fp8":
            ctx.save_for_backward(xq.data, xq.scale_inv, wq.data, wq.scale_inv)
        else:
            ctx.save_for_backward(x, weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        recipe: FP8Recipe = ctx.recipe
        need_x, need_w = ctx.needs_input_grad[:2]
        a, b, *rest = ctx.saved_tensors
        if recipe.backward == "fp8":
            x_hp = BlockQuantized(a, b, (1, TILE)).dequantize(torch.float32) if need_w else None
            wq = BlockQuantized(rest[0], rest[1], (TILE, TILE))
            k_in, w_shape = a.shape[1], rest[0].shape
        else:
            x_hp, weight = a, b
            k_in, w_shape = a.shape[1], b.shape
        dx = torch.zeros(grad_out.shape[0], k_in, dtype=torch.float32, device=grad_out.device) if need_x else None
        dw = torch.zeros(w_shape, dtype=torch.float32, device=grad_out.device) if need_w else None
        for e, s, t in _segments(ctx.counts):
            g = grad_out[s:t]
            if recipe.backward == "fp8":
                if need_x:
                    dx[s:t] = fp8_dgrad_gemm(g, wq[e], recipe)
                if need_w:
                    dw[e] = fp8_wgrad_gemm(g, x_hp[s:t], recipe)
            else:
                cdt = ctx.x_dtype
                if need_x:
                    dx[s:t] = (g.to(cdt) @ weight[e].to(cdt)).float()
                if need_w:
                    dw[e] = (g.to(cdt).t() @ x_hp[s:t].to(cdt)).float()
        return (
            dx.to(ctx.x_dtype) if dx is not None else None,
            dw.to(ctx.w_dtype) if dw is not None else None,
            None,
            None,
        )


def fp8_grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: list[int] | tuple[int, ...], recipe: FP8Recipe = DEFAULT_RECIPE
) -> torch.Tensor:
    """Rows of ``x`` [S, K], sorted by expert with ``counts[e]`` rows for expert ``e``, times ``weight[e].T``.

    ``weight`` is [E, N, K] (transformers' non-transposed layout). Differentiable in
    ``x`` and ``weight``.
    """
    if sum(counts) != x.shape[0] or len(counts) != weight.shape[0]:
        raise ValueError(f"counts {list(counts)} do not match x {tuple(x.shape)} / weight {tuple(weight.shape)}")
    return _FP8GroupedLinear.apply(x, weight, tuple(int(c) for c in counts), recipe)


def fp8_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward for transformers' ``@use_experts_implementation`` classes (DeepseekV3Experts)."""
    if getattr(self, "has_bias", False) or getattr(self, "is_transposed", False):
        raise NotImplementedError("posttrain_fp8 experts support the non-transposed, bias-free layout only")
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("posttrain_fp8 experts do not handle expert-parallel sentinels")
    recipe: FP8Recipe = getattr(self, "fp8_recipe", DEFAULT_RECIPE)
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
    x = hidden_states[order // top_k]
    up = self.gate_up_proj if getattr(self, "has_gate", True) else self.up_proj
    h = fp8_grouped_linear(x, up, counts, recipe)
    h = self._apply_gate(h) if getattr(self, "has_gate", True) else self.act_fn(h)
    out = fp8_grouped_linear(h, self.down_proj, counts, recipe)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    # reshape+sum rather than index_add_: deterministic, as in transformers' grouped_mm path
    return out[inverse].view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def register_fp8_experts() -> None:
    """Register ``"posttrain_fp8"`` in transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, fp8_experts_forward)


def _is_fused_experts(module: nn.Module) -> bool:
    w = getattr(module, "down_proj", None)
    return isinstance(w, nn.Parameter) and w.dim() == 3 and hasattr(module, "num_experts")


def enable_fp8_experts(model: nn.Module, recipe: FP8Recipe = DEFAULT_RECIPE) -> list[str]:
    """Switch every fused experts module of ``model`` to FP8; returns their names ([] if none).

    Uses ``model.set_experts_implementation`` when the model is a transformers
    ``PreTrainedModel``, and sets ``config._experts_implementation`` on each experts module
    where that did not take effect.
    """
    names = [n for n, m in model.named_modules() if _is_fused_experts(m)]
    if not names:
        return []
    register_fp8_experts()
    for n in names:
        model.get_submodule(n).fp8_recipe = recipe
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    # transformers 5.19's set_experts_implementation leaves the config alone for a subclass defined outside
    # transformers that does not declare support (it greps the class's module source for the decorator;
    # our MTP model declares it, see posttrain/modeling.py)
    for n in names:
        config = model.get_submodule(n).config
        if config._experts_implementation != EXPERTS_IMPLEMENTATION:
            config._experts_implementation = EXPERTS_IMPLEMENTATION
    return names
