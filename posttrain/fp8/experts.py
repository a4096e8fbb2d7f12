"""FP8 for transformers' fused MoE experts (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]).

transformers holds DeepSeek-V3's routed experts as 3-D parameters used through
``grouped_mm``, not as ``nn.Linear``, so :class:`~posttrain.fp8.linear.FP8Linear` cannot
reach them. transformers dispatches the experts forward through its public
``ExpertsInterface`` registry (``integrations/moe.py``, selected by
``config._experts_implementation``); this module registers ``"posttrain_fp8"`` there.
Its forward is transformers' grouped flow (sort token-expert pairs by expert, up/gate
projection, activation, down projection, weighted sum) with both projections done by
:func:`fp8_grouped_linear`, in one of two ways (``FP8Recipe.grouped``):

* ``blockwise``: the same §3.3 recipe as ``FP8Linear``, each expert's weight quantized in its
  own 128x128 blocks (exactly the blocks of the per-expert DeepSeek checkpoint tensors) and
  the wgrad token tiles never crossing an expert's segment; one GEMM per expert.
* ``rowwise`` (the default on Hopper, where torch has the kernel and it passes a start-up
  check): torch's grouped FP8 GEMM, one launch for all experts, with per-token and
  per-output-channel scales; bf16 wgrad.

Expert weights are quantized once per optimizer step (:func:`~posttrain.fp8.linear.weight_operand`)
and expert by expert (no full-precision temporary of the whole stack).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .gemm import TILE, BlockQuantized, fp8_gemm_nt
from .linear import (
    DEFAULT_RECIPE,
    FP8Recipe,
    _gemm_out_dtype,
    fp8_dgrad_gemm,
    fp8_wgrad_gemm,
    quantize_act,
    weight_operand,
)
from .quant import FP8_DTYPE, quantize_rows

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "fp8_grouped_linear",
    "fp8_experts_forward",
    "grouped_backend",
    "register_fp8_experts",
    "enable_fp8_experts",
]

log = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "posttrain_fp8"
GROUPED_ENV = "POSTTRAIN_FP8_GROUPED"  # "auto", "rowwise" (force) or "blockwise" (never the grouped kernel)


def _segments(counts: tuple[int, ...]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class _FP8GroupedLinear(torch.autograd.Function):
    """The report's recipe (§3.3.2) per expert: 1x128 activation tiles, each expert's own 128x128 blocks
    (exactly the blocks of the per-expert DeepSeek checkpoint tensors), wgrad token tiles that never
    cross an expert's segment. One GEMM per expert: the fp32 reference on CPU, ``scaled_mm`` on Hopper."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: tuple[int, ...], recipe: FP8Recipe):
        n_out = weight.shape[-2]
        out_dtype = _gemm_out_dtype(x.dtype)
        y = torch.zeros(x.shape[0], n_out, dtype=out_dtype, device=x.device)
        xq = quantize_act(x, recipe)  # 1x128 tiles are per row, so one call covers every expert
        w = weight_operand(weight, recipe)  # once per optimizer step, quantized expert by expert
        wq = w.blocks(weight)  # [E, ceil(N/128), ceil(K/128)] scales
        for e, s, t in _segments(counts):
            y[s:t] = fp8_gemm_nt(BlockQuantized(xq.data[s:t], xq.scale_inv[s:t], (1, TILE)), wq[e], out_dtype)
        ctx.counts, ctx.recipe = counts, recipe
        ctx.x_dtype, ctx.w_dtype, ctx.w_shape = x.dtype, weight.dtype, weight.shape
        if recipe.backward == "fp8":
            ctx.save_for_backward(xq.data, xq.scale_inv)
            ctx.w_fp8 = w
        else:
            ctx.save_for_backward(x, weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        recipe: FP8Recipe = ctx.recipe
        need_x, need_w = ctx.needs_input_grad[:2]
        a, b = ctx.saved_tensors
        if recipe.backward == "fp8":
            wq_t = ctx.w_fp8.blocks_t()  # W^T per expert: [E, K, N] operands
        else:
            x_hp, weight = a, b
        k_in, w_shape = a.shape[1], ctx.w_shape
        dx = torch.zeros(grad_out.shape[0], k_in, dtype=torch.float32, device=grad_out.device) if need_x else None
        dw = torch.zeros(w_shape, dtype=torch.float32, device=grad_out.device) if need_w else None
        for e, s, t in _segments(ctx.counts):
            g = grad_out[s:t]
            if recipe.backward == "fp8":
                if need_x:
                    dx[s:t] = fp8_dgrad_gemm(g, wq_t[e], recipe)
                if need_w:
                    dw[e] = fp8_wgrad_gemm(g, BlockQuantized(a[s:t], b[s:t], (1, TILE)), recipe)
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


# --- torch's grouped FP8 GEMM (row-wise scales), one launch for all experts ---------------------------
#
# Contact point: ``F.scaled_grouped_mm(..., scale_recipe_a=ScalingType.RowWise, ...)`` (torch >= 2.10;
# checks read from torch's aten/src/ATen/native/cuda/GroupedBlas.cpp ``_scaled_grouped_mm_cuda_v2``;
# measured on H100 with torch 2.11.0+cu130: 998 TF/s vs 720 for bf16 grouped_mm, 64 experts 7168->2048).
# Its 2d x 3d case wants mat_a [S, K] fp8 row-major, mat_b [E, K, N] fp8 "transposed" (strides (.., 1, K)),
# scale_a [S] and scale_b [E, N] float32, offs int32 cumulative row counts, bf16 out. torch has no
# block-scaled (1x128 / 128x128) grouped kernel for Hopper, so this path scales per token (over all K)
# and per output channel -- coarser than the report's groups (§3.3.2), hence a recipe option
# (FP8Recipe.grouped) and a start-up check against the emulation below. The wgrad GEMM runs in bf16
# through ``F.grouped_mm`` from the FP8 activation cache: torch's FP8 2d x 2d grouped case needs
# per-expert scales along the ragged token dim that nothing here produces at memory speed yet.


def _rowwise_operands_ok() -> bool:
    return hasattr(F, "scaled_grouped_mm") and hasattr(F, "ScalingType") and hasattr(F, "grouped_mm")


_grouped_state: dict[str, bool] = {}


def _grouped_fast_path_available(device: torch.device) -> bool:
    mode = os.environ.get(GROUPED_ENV, "auto")
    if mode == "blockwise" or device.type != "cuda" or not _rowwise_operands_ok():
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    key = str(device)
    if key not in _grouped_state:
        _grouped_state[key] = True if mode == "rowwise" else _probe_grouped(device)
    return _grouped_state[key]


def grouped_backend(device: torch.device | str, recipe: FP8Recipe = DEFAULT_RECIPE) -> str:
    """``"rowwise"`` (torch's grouped FP8 GEMM) or ``"blockwise"`` (per-expert block-scaled GEMMs)."""
    if recipe.grouped == "blockwise":
        return "blockwise"
    return "rowwise" if _grouped_fast_path_available(torch.device(device)) else "blockwise"


def _offsets(counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def _rowwise_grouped(xq, xs, wq_t, ws, offs) -> torch.Tensor:
    """``out[s] = (xq[s] * xs[s]) @ (wq_t[e] * ws[e]).T`` for the rows ``s`` of expert ``e``, bf16 out.

    ``wq_t`` is [E, N, K] (row-major per expert); torch wants it as [E, K, N] column-major.
    """
    RowWise = F.ScalingType.RowWise
    return F.scaled_grouped_mm(xq, wq_t.transpose(-2, -1), scale_a=xs, scale_recipe_a=RowWise, scale_b=ws,
                               scale_recipe_b=RowWise, offs=offs, output_dtype=torch.bfloat16)


class _FP8GroupedRowwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: tuple[int, ...], recipe: FP8Recipe):
        offs = _offsets(counts, x.device)
        xq, xs = quantize_rows(x, recipe.act_scale_fmt)  # per token, over K
        w = weight_operand(weight, recipe)
        wq, ws = w.rows(weight)  # [E, N, K] over K, [E, N]
        y = _rowwise_grouped(xq, xs, wq, ws, offs)
        ctx.counts, ctx.recipe, ctx.w_fp8 = counts, recipe, w
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        if recipe.backward == "fp8":
            ctx.save_for_backward(xq, xs, weight, offs)  # FP8 activation cache (§3.3.3)
        else:
            ctx.save_for_backward(x, weight, offs)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        recipe: FP8Recipe = ctx.recipe
        need_x, need_w = ctx.needs_input_grad[:2]
        if recipe.backward == "fp8":
            xq, xs, weight, offs = ctx.saved_tensors
        else:
            x, weight, offs = ctx.saved_tensors
        g = grad_out.to(torch.bfloat16)
        dx = dw = None
        if need_x:
            if recipe.backward == "fp8":
                gq, gs = quantize_rows(g, recipe.grad_scale_fmt)  # per token, over N
                wq_t, ws_t = ctx.w_fp8.rows_t(weight)  # W^T [E, K, N] over N, [E, K]
                dx = _rowwise_grouped(gq, gs, wq_t, ws_t, offs)
            else:
                dx = F.grouped_mm(g, weight.to(torch.bfloat16), offs=offs)
            dx = dx.to(ctx.x_dtype)
        if need_w:
            x_hp = (xq.float() * xs[:, None]).to(torch.bfloat16) if recipe.backward == "fp8" else x.to(torch.bfloat16)
            dw = F.grouped_mm(g.t(), x_hp, offs=offs)  # [E, N, K]: dY_e^T X_e over each expert's tokens
            empty = [e for e, n in enumerate(ctx.counts) if n == 0]
            if empty:  # a group without tokens is not written by every grouped kernel
                dw[empty] = 0
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None


def _emulate_rowwise(xq, xs, wq, ws, counts) -> torch.Tensor:
    """What :func:`_rowwise_grouped` computes, in float32 per expert (the probe's reference)."""
    out = torch.zeros(xq.shape[0], wq.shape[-2], dtype=torch.float32, device=xq.device)
    for e, s, t in _segments(counts):
        out[s:t] = (xq[s:t].float() * xs[s:t, None]) @ (wq[e].float() * ws[e][:, None]).T
    return out


def _probe_grouped(device: torch.device) -> bool:
    """Run the grouped kernel once on both orientations (forward [E, N, K] and dgrad [E, K, N] operands,
    an expert without tokens included) and compare with the emulation; False disables it."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        counts = (40, 0, 200, 16)
        x = torch.randn(sum(counts), 256, device=device, generator=g)
        w = torch.randn(len(counts), 384, 256, device=device, generator=g)
        offs = _offsets(counts, device)
        for weight in (w, w.transpose(-2, -1)):
            xq, xs = quantize_rows(x if weight is w else torch.randn(sum(counts), 384, device=device, generator=g))
            wq, ws = quantize_rows(weight)
            got = _rowwise_grouped(xq, xs, wq, ws, offs).float()
            ref = _emulate_rowwise(xq, xs, wq, ws, counts)
            err = (got - ref).norm() / ref.norm()
            if not bool(err < 1e-2):  # bf16 output: ~2^-9 relative
                log.warning("grouped FP8 GEMM disagrees with its emulation (rel err %.3g); using per-expert GEMMs", float(err))
                return False
        return True
    except Exception as e:  # noqa: BLE001 -- any failure means: do not use it
        log.warning("grouped FP8 GEMM unavailable (%s: %s); using per-expert GEMMs", type(e).__name__, e)
        return False


def fp8_grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: list[int] | tuple[int, ...], recipe: FP8Recipe = DEFAULT_RECIPE
) -> torch.Tensor:
    """Rows of ``x`` [S, K], sorted by expert with ``counts[e]`` rows for expert ``e``, times ``weight[e].T``.

    ``weight`` is [E, N, K] (transformers' non-transposed layout). Differentiable in
    ``x`` and ``weight``. Runs torch's grouped FP8 GEMM where :func:`grouped_backend` says
    ``"rowwise"`` (shapes permitting: K and N multiples of 16), the per-expert block-scaled recipe otherwise.
    """
    if sum(counts) != x.shape[0] or len(counts) != weight.shape[0]:
        raise ValueError(f"counts {list(counts)} do not match x {tuple(x.shape)} / weight {tuple(weight.shape)}")
    counts = tuple(int(c) for c in counts)
    n, k = weight.shape[-2], weight.shape[-1]
    if n % 16 == 0 and k % 16 == 0 and grouped_backend(x.device, recipe) == "rowwise":
        return _FP8GroupedRowwise.apply(x, weight, counts, recipe)
    return _FP8GroupedLinear.apply(x, weight, counts, recipe)


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
