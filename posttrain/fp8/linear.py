"""FP8 Linear layers that train, following DeepSeek-V3 report §3.3 "FP8 Training".

Recipe (§3.3.2, Figure 7):

* Forward ``Y = X W^T``: X quantized per 1x128 tile (per token, per 128 input channels),
  W per 128x128 block, fp32 accumulation.
* Dgrad ``dX = dY W``: dY quantized per 1x128 tile along the output channels (the
  contraction dim of this GEMM); W reuses the forward's 128x128 blocks, transposed.
* Wgrad ``dW = dY^T X``: the contraction runs over tokens, so both dY and X are
  quantized in 128x1 tiles (128 tokens x 1 channel). X's 1x128 FP8 tiles are re-tiled to
  128x1 (dequantize, transpose, quantize: the report's note on converting 1x128 tiles to
  128x1, §3.5.2) and that FP8 form is what the forward caches for this GEMM -- the
  report's "Low-Precision Storage" (§3.3.3). The re-tiling runs in the forward, in the
  same pass that quantizes X (one read of X on the Triton backend), and dY and dY^T are
  likewise quantized in one pass; the values are those of the separate steps, bit for bit.
* Master weights and weight gradients stay in the parameter's dtype (fp32 in the
  report); the components the report keeps in high precision (§3.3.1: embedding, output
  head, MoE gating, norms, the attention operator) are simply not swapped.

``backward="bf16"`` keeps the forward in FP8 but runs both backward GEMMs in the
activation dtype from the saved high-precision input and master weight.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from .gemm import TILE, BlockQuantized, ScaledMMOperandB, fast_path_active, fp8_gemm_nt, prepare_b
from .layout import is_fp8_weight_name
from .quant import quantize_groups, quantize_groups_t, quantize_rows, quantize_tiles_and_t, requantize_tiles_t

__all__ = [
    "FP8Recipe",
    "FP8Linear",
    "fp8_linear",
    "swap_linears_to_fp8",
    "default_fp8_module_filter",
    "clear_weight_cache",
]


@dataclass(frozen=True)
class FP8Recipe:
    """How an FP8 layer quantizes.

    ``act_scale_fmt``/``grad_scale_fmt`` = ``"ue8m0"`` restricts activation / gradient
    tile scales to powers of two (the report does this for the activations before the MoE
    up-projections and the gradients before the down-projections, §3.3.3 "Low-Precision
    Communication"); weights use ``weight_scale_fmt``.

    ``grouped`` picks the routed experts' GEMMs (:mod:`.experts`): ``"blockwise"`` is the report's
    1x128 / 128x128 recipe, one GEMM per expert; ``"rowwise"`` is torch's grouped FP8 GEMM with
    row-wise scales (one launch for all experts, coarser scaling); ``"auto"`` takes ``"rowwise"`` where
    that kernel exists and passed its start-up check (Hopper), ``"blockwise"`` elsewhere.
    """

    backward: str = "fp8"  # "fp8" or "bf16"
    act_scale_fmt: str | None = None
    grad_scale_fmt: str | None = None
    weight_scale_fmt: str | None = None
    grouped: str = "auto"  # "auto", "rowwise" or "blockwise"

    def __post_init__(self) -> None:
        if self.backward not in ("fp8", "bf16"):
            raise ValueError(f"backward must be 'fp8' or 'bf16', got {self.backward!r}")
        if self.grouped not in ("auto", "rowwise", "blockwise"):
            raise ValueError(f"grouped must be 'auto', 'rowwise' or 'blockwise', got {self.grouped!r}")


DEFAULT_RECIPE = FP8Recipe()


# --- the weight, quantized once per optimizer step ---------------------------------------------------
#
# The master weight changes only when the optimizer steps, so its FP8 copy is kept between forwards
# (gradient-accumulation micro-batches, activation-checkpointing recomputation, evaluation) and rebuilt
# after the next change. A change is: any ``torch.optim.Optimizer`` step (a global post-step hook bumps
# a generation counter -- needed because the fused AdamW kernels do not bump parameters' version
# counters), any other in-place update (the version counter: ``copy_`` under no_grad, ``load_state_dict``),
# or new storage (``data_ptr``). Frozen weights (``requires_grad=False``) ignore optimizer steps. Writes
# through ``.data`` and optimizers that are not ``torch.optim.Optimizer`` subclasses are not seen: call
# :func:`clear_weight_cache` after them. Memory: one fp8 copy (1 byte per parameter) per swapped weight,
# plus its transpose on the Hopper fast path -- of the *unsharded* weights under FSDP, which would undo
# the sharding; so ``POSTTRAIN_FP8_WEIGHT_CACHE=auto`` (default) caches only in a single process (no
# initialized torch.distributed group of more than one rank), ``1`` always, ``0`` never.

WEIGHT_CACHE_ENV = "POSTTRAIN_FP8_WEIGHT_CACHE"
_WEIGHT_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


# contact point: torch.optim.optimizer.register_optimizer_step_post_hook (public since torch 2.0; tested
# with 2.13): called after the step of every torch.optim.Optimizer, including fused AdamW and
# accelerate's AcceleratedOptimizer (which calls the wrapped optimizer's step).
register_optimizer_step_post_hook(_count_optimizer_step)


@dataclass
class QuantizedWeight:
    """The FP8 forms of one weight for one optimizer step, each built on first use from ``weight``
    (the entry holds no reference to the master weight, so it never keeps a parameter alive)."""

    scale_fmt: str | None
    _forms: dict[str, object] = field(default_factory=dict)
    cached: bool = False  # held by the per-step cache (see weight_operand)

    def _build(self, name: str, fn):
        got = self._forms.get(name)
        if got is None:
            got = self._forms[name] = fn()
        return got

    def blocks(self, weight: torch.Tensor | None) -> BlockQuantized:
        """128x128 blocks (report §3.3.2): the forward operand; [E, N, K] stacks quantized per expert."""
        return self._build("blocks", lambda: _quantize_weight_now(weight, self.scale_fmt))

    def blocks_t(self, weight: torch.Tensor | None = None) -> BlockQuantized:
        """W^T's blocks for the per-expert dgrad GEMMs of an [E, N, K] stack: the same blocks, transposed. On the
        Hopper fast path a contiguous copy (made once per step instead of at every backward); elsewhere a view.
        A 2-D weight's GEMMs take :meth:`gemm_operand`."""
        wq = self.blocks(weight)
        if not fast_path_active(wq.data.device):
            return wq.t()
        return self._build("blocks_t", lambda: BlockQuantized(
            wq.data.transpose(-2, -1).contiguous(), wq.scale_inv.transpose(-2, -1).contiguous(), (TILE, TILE)))

    def gemm_operand(self, weight: torch.Tensor, transposed: bool = False) -> BlockQuantized | ScaledMMOperandB:
        """A 2-D weight's B operand for the forward GEMM (W) or, ``transposed``, the dgrad's (W^T). On the Hopper fast
        path in ``F.scaled_mm``'s layout, padded and copied once per step (a weight whose rows are not a multiple
        of 128, kv_a's 576, was padded at every GEMM); elsewhere the blocks or their transposed view."""
        wq = self.blocks(weight)
        if not fast_path_active(wq.data.device):
            return wq.t() if transposed else wq
        if transposed:
            return self._build("mm_t", lambda: prepare_b(wq.t()))
        return self._build("mm", lambda: prepare_b(wq))

    def rows(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise fp8 of W [E, N, K] over K, scales [E, N]: the grouped forward operand."""
        return self._build("rows", lambda: quantize_rows(weight.detach(), self.scale_fmt))

    def rows_t(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise fp8 of W^T [E, K, N] over N (contiguous), scales [E, K]: the grouped dgrad operand."""
        return self._build("rows_t", lambda: quantize_rows(weight.detach().transpose(-2, -1), self.scale_fmt))


def _cache_enabled() -> bool:
    mode = os.environ.get(WEIGHT_CACHE_ENV, "auto")
    if mode in ("0", "false", "False", "no"):
        return False
    if mode == "auto":
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return False
    # inference tensors cannot be saved for a later backward; inside torch.compile the cache's Python
    # state would break the graph (and the compiled graph quantizes at memory speed anyway)
    compiling = getattr(torch, "compiler", None) is not None and torch.compiler.is_compiling()
    return not (torch.is_inference_mode_enabled() or compiling)


def weight_operand(weight: torch.Tensor, recipe: FP8Recipe) -> QuantizedWeight:
    """The FP8 forms of ``weight`` for this optimizer step (cached, see the note above)."""
    fmt = recipe.weight_scale_fmt
    if not _cache_enabled():
        return QuantizedWeight(fmt)
    step = _OPTIMIZER_STEPS[0] if weight.requires_grad else -1
    key = (step, weight._version, weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device, fmt)
    entry = _WEIGHT_CACHE.get(weight)
    if entry is None or entry[0] != key:
        entry = (key, QuantizedWeight(fmt, cached=True))
        _WEIGHT_CACHE[weight] = entry
    return entry[1]


def for_backward(w: QuantizedWeight) -> QuantizedWeight | None:
    """What an FP8 layer's forward keeps for its backward: the cached forms, which live on anyway, or nothing.

    Without the cache (the default under FSDP: more than one rank) the forward's FP8 weight would otherwise
    stay alive until the layer's backward -- an FP8 copy of every unsharded weight of the model at once
    (about 650 GB for V3's experts). The backward then quantizes again from the weight it saved, which
    FSDP gathers again for the backward as it does for nn.Linear. See :func:`weight_for_backward`."""
    return w if w.cached else None


def weight_for_backward(kept: QuantizedWeight | None, weight: torch.Tensor, recipe: FP8Recipe) -> QuantizedWeight:
    """The FP8 forms for a backward: those the forward kept (:func:`for_backward`), else built from ``weight``."""
    return kept if kept is not None else weight_operand(weight, recipe)


def clear_weight_cache() -> None:
    """Drop every cached FP8 weight (they are rebuilt on the next forward)."""
    _WEIGHT_CACHE.clear()


# --- the three GEMMs, shared by FP8Linear and the grouped (experts) function ----------------------


def _quantize_weight_now(weight: torch.Tensor, scale_fmt: str | None) -> BlockQuantized:
    # chunked over experts / row blocks: no full-precision temporary of a whole [E, out, in] stack
    q, s = quantize_groups(weight.detach(), (TILE, TILE), scale_fmt, check_finite=False)
    return BlockQuantized(q, s, (TILE, TILE))


def quantize_weight(weight: torch.Tensor, recipe: FP8Recipe) -> BlockQuantized:
    """128x128 blocks over the last two dims (an [E, out, in] expert stack is quantized per expert), uncached."""
    return _quantize_weight_now(weight, recipe.weight_scale_fmt)


def quantize_act(x2d: torch.Tensor, recipe: FP8Recipe) -> BlockQuantized:
    return BlockQuantized.quantize(x2d, (1, TILE), recipe.act_scale_fmt)


def quantize_act_and_t(x2d: torch.Tensor, recipe: FP8Recipe) -> tuple[BlockQuantized, BlockQuantized]:
    """X in 1x128 tiles (the forward GEMM's operand) and X^T re-tiled from them to 128x1 tiles (the wgrad's,
    cached for the backward; report §3.3.3, §3.5.2), from one read of X."""
    (q, s), (qt, st) = quantize_tiles_and_t(x2d, TILE, recipe.act_scale_fmt, requantize=True)
    return BlockQuantized(q, s, (1, TILE)), BlockQuantized(qt, st, (1, TILE))


def retile_act_t(xq: BlockQuantized, recipe: FP8Recipe) -> BlockQuantized:
    """X^T in 128x1 tiles from X's 1x128 FP8 tiles (report §3.5.2): the wgrad's operand where the forward did not
    make it (the per-expert GEMMs, whose token tiles must not cross an expert's run)."""
    qt, st = requantize_tiles_t(xq.data, xq.scale_inv, TILE, recipe.act_scale_fmt)
    return BlockQuantized(qt, st, (1, TILE))


def quantize_grad(
    g2d: torch.Tensor, recipe: FP8Recipe, *, dgrad: bool = True, wgrad: bool = True
) -> tuple[BlockQuantized | None, BlockQuantized | None]:
    """dY in 1x128 tiles along N (the dgrad's operand) and dY^T in 1x128 tiles along tokens (the wgrad's 128x1
    tiles of dY), each only if asked for; both from one read of dY when both are."""
    fmt = recipe.grad_scale_fmt
    if dgrad and wgrad:
        (q, s), (qt, st) = quantize_tiles_and_t(g2d, TILE, fmt)
        return BlockQuantized(q, s, (1, TILE)), BlockQuantized(qt, st, (1, TILE))
    gq = BlockQuantized.quantize(g2d, (1, TILE), fmt) if dgrad else None
    gq_t = BlockQuantized(*quantize_groups_t(g2d, (1, TILE), fmt), (1, TILE)) if wgrad else None
    return gq, gq_t


def fp8_forward_gemm(
    xq: BlockQuantized, wq: BlockQuantized | ScaledMMOperandB, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Y = X W^T (fp32 accumulation; ``out_dtype`` written by the GEMM itself on the fast path)."""
    return fp8_gemm_nt(xq, wq, out_dtype)


def fp8_dgrad_gemm(
    gq: BlockQuantized, wq_t: BlockQuantized | ScaledMMOperandB, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """dX = dY W: dY in 1x128 tiles along N; ``wq_t`` is W^T's operand (W's blocks transposed)."""
    return fp8_gemm_nt(gq, wq_t, out_dtype)


def fp8_wgrad_gemm(gq_t: BlockQuantized, xq_t: BlockQuantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dW = dY^T X with dY and X both in 128x1 tiles (groups of 128 tokens), fp32 accumulation."""
    return fp8_gemm_nt(gq_t, xq_t, out_dtype)


def _gemm_out_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 straight out of the GEMM (no fp32 round trip); anything else through fp32
    return dtype if dtype == torch.bfloat16 else torch.float32


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: FP8Recipe):
        x2d = x.reshape(-1, x.shape[-1])
        need_w = ctx.needs_input_grad[1]
        fp8_wgrad = recipe.backward == "fp8" and need_w
        # X^T for the wgrad is made now, from the same read of X (see the module docstring)
        xq, xq_t = quantize_act_and_t(x2d, recipe) if fp8_wgrad else (quantize_act(x2d, recipe), None)
        w = weight_operand(weight, recipe)
        y = fp8_forward_gemm(xq, w.gemm_operand(weight), _gemm_out_dtype(x.dtype) if bias is None else torch.float32)
        del xq  # the forward's X tiles are not needed again
        if bias is not None:
            y = y + bias.float()
        ctx.recipe = recipe
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        if recipe.backward == "fp8":
            # FP8 activation cache (§3.3.3): 1 byte per element instead of 2-4, and none when W is frozen
            ctx.save_for_backward(weight, *((xq_t.data, xq_t.scale_inv) if fp8_wgrad else ()))
            ctx.w_fp8 = for_backward(w)  # this step's FP8 weight (and, on Hopper, its transpose, built once)
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
            weight, *xt = ctx.saved_tensors
            gq, gq_t = quantize_grad(g2d, recipe, dgrad=need_x, wgrad=need_w)
            if need_x:
                wq_t = weight_for_backward(ctx.w_fp8, weight, recipe).gemm_operand(weight, transposed=True)
                dx = fp8_dgrad_gemm(gq, wq_t, _gemm_out_dtype(ctx.x_dtype))
            if need_w:
                dw = fp8_wgrad_gemm(gq_t, BlockQuantized(*xt, (1, TILE)), _gemm_out_dtype(ctx.w_dtype))
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


# Under torch.compile (`torch_compile: true`, regional compilation) the FP8 layers run eagerly, one graph
# break at each, and the rest of the block compiles. Traced, they fell apart: Dynamo broke the graph inside
# the autograd Function (`is_inference_mode_enabled`) and recompiled `FP8Linear.forward` for every weight
# shape, past its cache limit; and without that break, torch 2.13's Dynamo fails on a second FP8 linear
# in one graph under dynamic shapes ("lift_tracked_freevar_to_input should not be called on root
# SubgraphTracer"). Eager, they keep their Triton quantizers, cuBLAS FP8 GEMMs and the per-step weight
# cache, which a traced graph would quantize again at every forward.
@torch.compiler.disable
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

    @torch.compiler.disable  # the break at the call, not inside a forward Dynamo compiles per shape
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
