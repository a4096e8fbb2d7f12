"""FP8 Linear layers that train, following DeepSeek-V3 report §3.3 "FP8 Training".

Recipe (§3.3.2, Figure 7):

* Forward ``Y = X W^T``: X quantized per 1x128 tile (per token, per 128 input channels),
  W per 128x128 block, fp32 accumulation.
* Dgrad ``dX = dY W``: dY quantized per 1x128 tile along the output channels (the
  contraction dim of this GEMM); W reuses the forward's 128x128 blocks, transposed.
* Wgrad ``dW = dY^T X``: the contraction runs over tokens, so both dY and X are
  quantized in 128x1 tiles (128 tokens x 1 channel). X is cached in FP8 from the forward
  (1x128) and re-tiled to 128x1 for this GEMM -- the report's "Low-Precision Storage"
  (§3.3.3) and its note on converting 1x128 tiles to 128x1 in the backward (§3.5.2).
* Master weights and weight gradients stay in the parameter's dtype (fp32 in the
  report); the components the report keeps in high precision (§3.3.1: embedding, output
  head, MoE gating, norms, the attention operator) are simply not swapped.

``backward="bf16"`` keeps the forward in FP8 but runs both backward GEMMs in the
activation dtype from the saved high-precision input and master weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .gemm import TILE, BlockQuantized, fp8_gemm_nt
from .layout import is_fp8_weight_name

__all__ = ["FP8Recipe", "FP8Linear", "fp8_linear", "swap_linears_to_fp8", "default_fp8_module_filter"]


@dataclass(frozen=True)
class FP8Recipe:
    """How an FP8 layer quantizes.

    ``act_scale_fmt``/``grad_scale_fmt`` = ``"ue8m0"`` restricts activation / gradient
    tile scales to powers of two (the report does this for the activations before the MoE
    up-projections and the gradients before the down-projections, §3.3.3 "Low-Precision
    Communication"); weights use ``weight_scale_fmt``.
    """

    backward: str = "fp8"  # "fp8" or "bf16"
    act_scale_fmt: str | None = None
    grad_scale_fmt: str | None = None
    weight_scale_fmt: str | None = None

    def __post_init__(self) -> None:
        if self.backward not in ("fp8", "bf16"):
            raise ValueError(f"backward must be 'fp8' or 'bf16', got {self.backward!r}")


DEFAULT_RECIPE = FP8Recipe()


# --- the three GEMMs, shared by FP8Linear and the grouped (experts) function ----------------------


def quantize_weight(weight: torch.Tensor, recipe: FP8Recipe) -> BlockQuantized:
    """128x128 blocks over the last two dims (an [E, out, in] expert stack is quantized per expert)."""
    return BlockQuantized.quantize(weight.detach(), (TILE, TILE), recipe.weight_scale_fmt)


def quantize_act(x2d: torch.Tensor, recipe: FP8Recipe) -> BlockQuantized:
    return BlockQuantized.quantize(x2d, (1, TILE), recipe.act_scale_fmt)


def fp8_forward_gemm(xq: BlockQuantized, wq: BlockQuantized) -> torch.Tensor:
    """Y = X W^T, fp32 out."""
    return fp8_gemm_nt(xq, wq, torch.float32)


def fp8_dgrad_gemm(g2d: torch.Tensor, wq: BlockQuantized, recipe: FP8Recipe) -> torch.Tensor:
    """dX = dY W: dY in 1x128 tiles along N, W^T's blocks are W's blocks transposed."""
    gq = BlockQuantized.quantize(g2d, (1, TILE), recipe.grad_scale_fmt)
    return fp8_gemm_nt(gq, wq.t(), torch.float32)


def fp8_wgrad_gemm(g2d: torch.Tensor, x2d: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
    """dW = dY^T X with dY and X both in 128x1 tiles (groups of 128 tokens), fp32 out."""
    gq = BlockQuantized.quantize(g2d.t(), (1, TILE), recipe.grad_scale_fmt)
    xq = BlockQuantized.quantize(x2d.t(), (1, TILE), recipe.act_scale_fmt)
    return fp8_gemm_nt(gq, xq, torch.float32)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: FP8Recipe):
        x2d = x.reshape(-1, x.shape[-1])
        xq = quantize_act(x2d, recipe)
        wq = quantize_weight(weight, recipe)
        y = fp8_forward_gemm(xq, wq)
        if bias is not None:
            y = y + bias.float()
        ctx.recipe = recipe
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        if recipe.backward == "fp8":
            # FP8 activation cache (§3.3.3): 1 byte per element instead of 2-4.
            ctx.save_for_backward(xq.data, xq.scale_inv, wq.data, wq.scale_inv)
        else:
            ctx.save_for_backward(x2d, weight)
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        recipe: FP8Recipe = ctx.recipe
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if recipe.backward == "fp8":
            xq_data, xq_scale, wq_data, wq_scale = ctx.saved_tensors
            if need_x:
                dx = fp8_dgrad_gemm(g2d, BlockQuantized(wq_data, wq_scale, (TILE, TILE)), recipe)
            if need_w:
                x_hp = BlockQuantized(xq_data, xq_scale, (1, TILE)).dequantize(torch.float32)
                dw = fp8_wgrad_gemm(g2d, x_hp, recipe)
        else:
            x2d, weight = ctx.saved_tensors
            cdt = ctx.x_dtype
            if need_x:
                dx = g2d.to(cdt) @ weight.to(cdt)
            if need_w:
                dw = g2d.to(cdt).t() @ x2d.to(cdt)
        if dx is not None:
            dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if dw is not None:
            dw = dw.to(ctx.w_dtype)
        if need_b and ctx.b_dtype is not None:
            db = g2d.float().sum(0).to(ctx.b_dtype)
        return dx, dw, db, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, recipe: FP8Recipe = DEFAULT_RECIPE
) -> torch.Tensor:
    """``F.linear`` with the FP8 recipe above, differentiable in ``x``, ``weight`` and ``bias``."""
    return _FP8LinearFunction.apply(x, weight, bias, recipe)


class FP8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose matmuls run in block-scaled FP8; ``weight`` is the high-precision master.

    Parameter names and shapes are those of ``nn.Linear``, so state dicts, optimizers and
    checkpoints are unaffected by swapping.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recipe: FP8Recipe = DEFAULT_RECIPE,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe = DEFAULT_RECIPE) -> "FP8Linear":
        """Wrap an existing ``nn.Linear``, sharing its Parameter objects (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", recipe=recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8_backward={self.recipe.backward}"


def default_fp8_module_filter(name: str, module: nn.Module) -> bool:
    """Attention projections, dense MLP, shared- and per-expert Linears: the DeepSeek FP8 set."""
    return is_fp8_weight_name(f"{name}.weight")


def swap_linears_to_fp8(
    model: nn.Module,
    module_filter: Callable[[str, nn.Module], bool] | None = None,
    recipe: FP8Recipe = DEFAULT_RECIPE,
    *,
    experts: bool = True,
) -> list[str]:
    """Replace matching ``nn.Linear`` modules by :class:`FP8Linear` in place; returns their names.

    ``module_filter(name, module)`` defaults to :func:`default_fp8_module_filter` (embedding,
    ``lm_head``, router, MTP ``eh_proj`` stay high precision). With ``experts=True``,
    transformers' fused expert modules (3-D ``gate_up_proj``/``down_proj``) are switched to
    the ``"posttrain_fp8"`` experts implementation (see :mod:`posttrain.fp8.experts`) and
    their names are included in the result.
    """
    module_filter = module_filter or default_fp8_module_filter
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and module_filter(full, child):
                setattr(module, child_name, FP8Linear.from_linear(child, recipe))
                swapped.append(full)
    if experts:
        from .experts import enable_fp8_experts

        swapped += enable_fp8_experts(model, recipe)
    return swapped
