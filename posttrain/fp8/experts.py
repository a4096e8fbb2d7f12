"""FP8 for transformers' fused MoE experts (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]).

transformers holds DeepSeek-V3's routed experts as 3-D parameters used through
``grouped_mm``, not as ``nn.Linear``, so :class:`~posttrain.fp8.linear.FP8Linear` cannot
reach them. transformers dispatches the experts forward through its public
``ExpertsInterface`` registry (``integrations/moe.py``, selected by
``config._experts_implementation``); this module registers ``"posttrain_fp8"`` there.
Its forward is transformers' grouped flow (sort token-expert pairs by expert, up/gate
projection, activation, down projection, weighted sum; the sort, dispatch, gating and weighted sum are
:mod:`posttrain.routed_experts`', fused kernels on CUDA) with both projections done by
:func:`fp8_grouped_linear`, in one of two ways (``FP8Recipe.grouped``):

* ``blockwise``: the same §3.3 recipe as ``FP8Linear``, each expert's weight quantized in its
  own 128x128 blocks (exactly the blocks of the per-expert DeepSeek checkpoint tensors) and
  the wgrad token tiles never crossing an expert's segment; one GEMM per expert.
* ``rowwise`` (the default on Hopper, where torch has the kernel and it passes a start-up
  check): torch's grouped FP8 GEMM, one launch for all experts, with per-token and
  per-output-channel scales; the wgrad through torch's 2d x 2d grouped FP8 GEMM with scales per expert
  and channel over the expert's tokens where a start-up check passes, in bf16 otherwise.

Expert weights are quantized once per optimizer step (:func:`~posttrain.fp8.linear.weight_operand`)
and expert by expert (no full-precision temporary of the whole stack).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..routed_experts import experts_forward, fused_routing_usable
from ..start_up_check import decided_once
from .gemm import TILE, BlockQuantized, fp8_gemm_nt
from .linear import (
    DEFAULT_RECIPE,
    FP8Recipe,
    _gemm_out_dtype,
    fp8_dgrad_gemm,
    fp8_wgrad_gemm,
    for_backward,
    quantize_act,
    quantize_grad,
    retile_act_t,
    weight_for_backward,
    weight_operand,
)
from .quant import FP8_DTYPE, FP8_MAX, compute_scale_inv, quant_backend, quantize_rows, run_triton

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
            ctx.save_for_backward(xq.data, xq.scale_inv, weight)
            ctx.w_fp8 = for_backward(w)
        else:
            ctx.save_for_backward(x, weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        recipe: FP8Recipe = ctx.recipe
        need_x, need_w = ctx.needs_input_grad[:2]
        a, b, *rest = ctx.saved_tensors
        if recipe.backward == "fp8":
            weight = rest[0]
            wq_t = weight_for_backward(ctx.w_fp8, weight, recipe).blocks_t(weight)  # W^T per expert: [E, K, N]
        else:
            x_hp, weight = a, b
        k_in, w_shape = a.shape[1], ctx.w_shape
        dx = torch.zeros(grad_out.shape[0], k_in, dtype=torch.float32, device=grad_out.device) if need_x else None
        # dW in the weight's dtype, each expert's float32 product rounded as it is written: a float32 stack
        # and then a cast would hold two copies of the whole stack (42 GiB at 256 x 4096 x 7168 in bf16)
        dw = torch.zeros(w_shape, dtype=ctx.w_dtype, device=grad_out.device) if need_w else None
        for e, s, t in _segments(ctx.counts):
            g = grad_out[s:t]
            if recipe.backward == "fp8":
                gq, gq_t = quantize_grad(g, recipe, dgrad=need_x, wgrad=need_w)
                if need_x:
                    dx[s:t] = fp8_dgrad_gemm(gq, wq_t[e])
                if need_w:
                    dw[e] = fp8_wgrad_gemm(gq_t, retile_act_t(BlockQuantized(a[s:t], b[s:t], (1, TILE)), recipe))
            else:
                cdt = ctx.x_dtype
                if need_x:
                    dx[s:t] = (g.to(cdt) @ weight[e].to(cdt)).float()
                if need_w:
                    dw[e] = (g.to(cdt).t() @ x_hp[s:t].to(cdt)).float()
        return (
            dx.to(ctx.x_dtype) if dx is not None else None,
            dw,
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
# (FP8Recipe.grouped) and a start-up check against the emulation below. The wgrad is the 2d x 2d
# grouped FP8 GEMM below (scales per expert along the ragged token dim), or bf16 ``F.grouped_mm`` from
# the FP8 activation cache where that kernel fails its start-up check.


def _rowwise_operands_ok() -> bool:
    return hasattr(F, "scaled_grouped_mm") and hasattr(F, "ScalingType") and hasattr(F, "grouped_mm")


_grouped_state: dict[str, bool] = {}


def _grouped_fast_path_available(device: torch.device) -> bool:
    mode = os.environ.get(GROUPED_ENV, "auto")
    if mode == "blockwise" or device.type != "cuda" or not _rowwise_operands_ok():
        return False
    return decided_once(_grouped_state, device, lambda: torch.cuda.get_device_capability(device) >= (9, 0)
                        and (mode == "rowwise" or _probe_grouped(device)))


def grouped_backend(device: torch.device | str, recipe: FP8Recipe = DEFAULT_RECIPE) -> str:
    """``"rowwise"`` (torch's grouped FP8 GEMM) or ``"blockwise"`` (per-expert block-scaled GEMMs)."""
    if recipe.grouped == "blockwise":
        return "blockwise"
    return "rowwise" if _grouped_fast_path_available(torch.device(device)) else "blockwise"


# The rowwise path keeps the routing counts on the device (an int64 tensor [E]) from the router to the
# last kernel: reading them on the host would make the CPU wait for the GPU in every MoE layer, forward
# and backward. Only Python ints derived from shapes steer it.


def _device_counts(counts, device: torch.device) -> torch.Tensor:
    """``counts`` as an int64 tensor on ``device`` (a host-to-device copy only if they are Python ints)."""
    if isinstance(counts, torch.Tensor):
        return counts.to(device=device, dtype=torch.int64)
    return torch.tensor(counts, dtype=torch.int64, device=device)


def _zero_groups_without_tokens(out: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``out`` [E, ...] with the groups of experts without tokens zeroed: not every grouped kernel writes them.
    In place and by a mask (no list of experts read on the host, no second [E, ...] buffer)."""
    empty = (counts == 0).view(-1, *([1] * (out.dim() - 1)))
    return out.masked_fill_(empty, 0)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """The grouped kernels' ``offs``: each group's end row, int32, on the counts' device."""
    return torch.cumsum(counts, 0, dtype=torch.int32)


def _rowwise_grouped(xq, xs, wq_t, ws, offs) -> torch.Tensor:
    """``out[s] = (xq[s] * xs[s]) @ (wq_t[e] * ws[e]).T`` for the rows ``s`` of expert ``e``, bf16 out.

    ``wq_t`` is [E, N, K] (row-major per expert); torch wants it as [E, K, N] column-major.
    """
    RowWise = F.ScalingType.RowWise
    return F.scaled_grouped_mm(xq, wq_t.transpose(-2, -1), scale_a=xs, scale_recipe_a=RowWise, scale_b=ws,
                               scale_recipe_b=RowWise, offs=offs, output_dtype=torch.bfloat16)


class _FP8GroupedRowwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, recipe: FP8Recipe):
        offs = _offsets(counts)
        xq, xs = quantize_rows(x, recipe.act_scale_fmt)  # per token, over K
        w = weight_operand(weight, recipe)
        wq, ws = w.rows(weight)  # [E, N, K] over K, [E, N]
        y = _rowwise_grouped(xq, xs, wq, ws, offs)
        ctx.recipe, ctx.w_fp8 = recipe, for_backward(w)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        if recipe.backward == "fp8":
            ctx.save_for_backward(xq, xs, weight, counts, offs)  # FP8 activation cache (§3.3.3)
        else:
            ctx.save_for_backward(x, weight, counts, offs)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        recipe: FP8Recipe = ctx.recipe
        need_x, need_w = ctx.needs_input_grad[:2]
        if recipe.backward == "fp8":
            xq, xs, weight, counts, offs = ctx.saved_tensors
        else:
            x, weight, counts, offs = ctx.saved_tensors
        g = grad_out.to(torch.bfloat16)
        dx = dw = None
        if need_x:
            if recipe.backward == "fp8":
                gq, gs = quantize_rows(g, recipe.grad_scale_fmt)  # per token, over N
                wq_t, ws_t = weight_for_backward(ctx.w_fp8, weight, recipe).rows_t(weight)  # W^T [E, K, N] over N
                dx = _rowwise_grouped(gq, gs, wq_t, ws_t, offs)
            else:
                dx = F.grouped_mm(g, weight.to(torch.bfloat16), offs=offs)
            dx = dx.to(ctx.x_dtype)
        if need_w:
            if recipe.backward == "fp8" and _grouped_wgrad_available(g.device):
                # X^T's runs re-quantized from the FP8 cache itself (the report's re-tiling, §3.5.2, per expert)
                dw = fp8_grouped_wgrad(g, xq, counts, recipe, x_row_scale=xs)
            else:  # [E, N, K]: dY_e^T X_e over each expert's tokens
                x_hp = (xq.float() * xs[:, None]).to(torch.bfloat16) if recipe.backward == "fp8" else x.to(torch.bfloat16)
                dw = _zero_groups_without_tokens(F.grouped_mm(g.t(), x_hp, offs=offs), counts)
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None


# --- FP8 wgrad of the grouped path: torch's 2d x 2d grouped FP8 GEMM ----------------------------------
#
# Contact point: ``torch._scaled_grouped_mm`` (torch >= 2.8). Its shape, stride and scale checks are the
# meta kernel in torch/_meta_registrations.py (``_meta_grouped_mm_common``, "all the checks from
# _grouped_mm_cuda()/_scaled_grouped_mm_cuda()"); tests/test_fp8_experts_grouped.py runs the operands
# built here through it on meta tensors, for the V3 expert shapes. dW_e = dY_e^T X_e contracts over expert
# e's run of tokens, so mat_a = dY^T [N, S] row-major and mat_b = X [S, K] column-major, with offs marking
# each run along S; the row-wise scales are per run: scale_a [E*N] (dY^T's rows over the run's tokens) and
# scale_b [E*K], group-major. Every run is padded with zero tokens to a multiple of WGRAD_RUN_ALIGN, so that
# each run starts 16-byte aligned for the kernel's fp8 loads (the meta checks cannot see offsets); zero
# tokens add nothing. An expert without tokens gets one run of WGRAD_RUN_ALIGN zero tokens: for this
# layout (row-major mat_a) the kernel's data preparation asserts on the device that every group has K > 0
# ("CUTLASS cannot handle delta=0", GroupMMCommon.cuh, since pytorch#153226; later versions allow K = 0,
# and a device assert would end the process, probe included). A run of zeros gives that expert dW = 0, so
# no zeroing pass over [E, N, K] follows. The padded total depends on the counts, so the buffer takes a
# static upper bound (_run_layout) and the runs end before its last rows, which belong to no group:
# torch's checks allow that (offs[-1] <= the buffer's length in GroupMMCommon.cuh; the meta kernel reads
# no offsets). Used after a start-up check against the emulation on the device (as the forward), with the
# bf16 wgrad as the fallback.

WGRAD_ENV = "POSTTRAIN_FP8_GROUPED_WGRAD"  # "auto", "fp8" (force) or "bf16" (never the 2d x 2d kernel)
WGRAD_RUN_ALIGN = 16  # tokens: 16 bytes of fp8
_wgrad_state: dict[str, bool] = {}


class _RunLayout(NamedTuple):
    """Where each expert's run of tokens goes in the padded layout (device tensors [E], but ``rows``)."""

    starts: torch.Tensor  # first token of each run in the sorted tokens
    padded_starts: torch.Tensor  # its first row in the padded layout
    padded: torch.Tensor  # the padded run lengths (an empty run: WGRAD_RUN_ALIGN rows of zeros)
    padded_ends: torch.Tensor  # padded_starts + padded: the grouped kernel's offsets
    rows: int  # the layout's rows: a bound from shapes alone, past the last run


def _run_layout(counts: torch.Tensor, tokens: int, align: int = WGRAD_RUN_ALIGN) -> _RunLayout:
    """Each run grows by less than ``align`` tokens (an empty one by exactly ``align``), so
    ``(tokens // align + E) * align`` rows always hold the layout; no count is read on the host."""
    padded = (counts.clamp_min(1) + align - 1) // align * align
    padded_ends = padded.cumsum(0)
    return _RunLayout(counts.cumsum(0) - counts, padded_ends - padded, padded, padded_ends,
                      (tokens // align + counts.shape[0]) * align)


def _padded_runs(counts: torch.Tensor, tokens: int, layout: _RunLayout | None = None):
    """The padded layout, on the device: (each token's row in it [tokens], each of its rows' expert
    [layout rows], the runs' ends int32 [E]). Rows past the last run are given to the last expert: they
    stay zero, so they change neither its scales nor, lying outside every group, any product."""
    lay = layout if layout is not None else _run_layout(counts, tokens)
    token_rows = torch.arange(tokens, device=counts.device)
    expert = torch.searchsorted(lay.starts + counts, token_rows, right=True)  # tokens are sorted by expert
    dest = token_rows + (lay.padded_starts - lay.starts)[expert]
    rows = torch.arange(lay.rows, device=counts.device)
    padded_expert = torch.searchsorted(lay.padded_ends, rows, right=True).clamp_max_(counts.shape[0] - 1)
    return dest, padded_expert, lay.padded_ends.to(torch.int32)


def quantize_token_runs(t: torch.Tensor, counts, scale_fmt: str | None = None, row_scale: torch.Tensor | None = None,
                        layout: _RunLayout | None = None):
    """``t`` [S, C] (rows sorted by expert, ``counts[e]`` rows for expert ``e``; ints or a tensor) as the
    transposed fp8 operand of the grouped wgrad: ``(q [C, S_pad] row-major, scales [E*C] float32, offs)``,
    one scale per (expert, column) over that expert's tokens, each run zero-padded to WGRAD_RUN_ALIGN
    tokens (see _padded_runs), ``offs`` the runs' ends (int32, the kernel's offsets). One Triton kernel
    where the quantizer backend is Triton (posttrain.fp8.triton_quant, bit for bit the reference below).
    ``row_scale`` [S]: ``t`` is the row-wise fp8 activation cache, standing for ``t.float() * row_scale[:, None]``
    (dequantized on the fly by the Triton kernel, with no high-precision copy). ``layout``: these counts'
    :func:`_run_layout`, when the caller quantizes several tensors over the same runs."""
    counts = _device_counts(counts, t.device)
    if quant_backend(t.device) == "triton":
        got = run_triton(lambda: quantize_token_runs_triton(t, counts, scale_fmt, row_scale, layout))
        if got is not None:
            return got
    return quantize_token_runs_reference(t, counts, scale_fmt, row_scale, layout)


def quantize_token_runs_triton(t: torch.Tensor, counts: torch.Tensor, scale_fmt: str | None = None,
                               row_scale: torch.Tensor | None = None, layout: _RunLayout | None = None):
    """:func:`quantize_token_runs` as one Triton kernel over the same layout (no backend choice, no fallback)."""
    from . import triton_quant

    lay = layout if layout is not None else _run_layout(counts, t.shape[0])
    q, s = triton_quant.quantize_token_runs(t, counts, lay.starts, lay.padded_starts, lay.padded, lay.rows, scale_fmt,
                                            WGRAD_RUN_ALIGN, row_scale)
    return q, s, lay.padded_ends.to(torch.int32)


def quantize_token_runs_reference(t: torch.Tensor, counts: torch.Tensor, scale_fmt: str | None = None,
                                  row_scale: torch.Tensor | None = None, layout: _RunLayout | None = None):
    """:func:`quantize_token_runs` in eager torch ops (several passes over memory): the definition."""
    if row_scale is not None:
        t = t.float() * row_scale[:, None]
    dest, padded_expert, offs = _padded_runs(counts, t.shape[0], layout)
    cols = t.shape[1]
    t_pad = t.new_zeros(padded_expert.shape[0], cols)
    t_pad[dest] = t
    amax = t.new_zeros(counts.shape[0], cols).scatter_reduce_(
        0, padded_expert[:, None].expand(-1, cols), t_pad.abs(), "amax", include_self=True)
    scale = compute_scale_inv(amax, scale_fmt, check_finite=False)  # [E, C]
    q = torch.empty(t_pad.shape, dtype=FP8_DTYPE, device=t.device)
    rows = max(1, (1 << 24) // max(cols, 1))  # bounds the float32 temporary
    for s in range(0, t_pad.shape[0], rows):
        part = t_pad[s:s + rows].float() / scale[padded_expert[s:s + rows]]
        q[s:s + rows] = part.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.t().contiguous(), scale.reshape(-1), offs


def _grouped_wgrad_kernel(gq_t, gs, xq_t, xs, offs) -> torch.Tensor:
    """``out[e] = (gq_t[:, run e] * gs[e]) @ (xq_t[:, run e] * xs[e]).T``, [E, N, K] bf16."""
    return torch._scaled_grouped_mm(gq_t, xq_t.t(), gs, xs, offs=offs, out_dtype=torch.bfloat16)


def _emulate_grouped_wgrad(gq_t, gs, xq_t, xs, offs) -> torch.Tensor:
    """What :func:`_grouped_wgrad_kernel` computes, in float32 per expert (the probe's reference)."""
    n, k, e_count = gq_t.shape[0], xq_t.shape[0], offs.shape[0]
    out = torch.zeros(e_count, n, k, dtype=torch.float32, device=gq_t.device)
    ends = offs.tolist()  # the start-up check only
    for e, s, t in _segments(tuple(b - a for a, b in zip([0] + ends, ends))):
        out[e] = (gq_t[:, s:t].float() * gs[e * n:(e + 1) * n, None]) @ (xq_t[:, s:t].float() * xs[e * k:(e + 1) * k, None]).T
    return out


def fp8_grouped_wgrad(
    grad_out: torch.Tensor, x: torch.Tensor, counts, recipe: FP8Recipe, x_row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """dW [E, N, K] = per expert ``grad_out_e^T x_e``, both quantized per (expert, channel) over the expert's
    tokens, in one grouped FP8 GEMM (:func:`_grouped_wgrad_kernel`); experts without tokens get zeros (their
    run is all zero tokens). ``counts``: ints or a tensor (kept on the device). ``x_row_scale``: ``x`` is the
    forward's row-wise fp8 cache with these per-token scales (re-quantized per run straight from it)."""
    counts = _device_counts(counts, grad_out.device)
    lay = _run_layout(counts, grad_out.shape[0])  # both operands run over the same tokens: one layout for the two
    gq_t, gs, offs = quantize_token_runs(grad_out, counts, recipe.grad_scale_fmt, layout=lay)
    xq_t, xs, _ = quantize_token_runs(x, counts, recipe.act_scale_fmt, x_row_scale, layout=lay)
    return _grouped_wgrad_kernel(gq_t, gs, xq_t, xs, offs)


def _grouped_wgrad_available(device: torch.device | str) -> bool:
    device = torch.device(device)
    mode = os.environ.get(WGRAD_ENV, "auto")
    if mode == "bf16" or not hasattr(torch, "_scaled_grouped_mm"):
        return False
    if mode == "fp8":
        return True
    if device.type != "cuda":
        return False
    return decided_once(_wgrad_state, device, lambda: torch.cuda.get_device_capability(device) >= (9, 0)
                        and _probe_grouped_wgrad(device))


def _probe_grouped_wgrad(device: torch.device) -> bool:
    """Run the 2d x 2d kernel once (uneven runs, an expert without tokens) against the emulation."""

    def pairs():
        g = torch.Generator(device=device).manual_seed(0)
        counts = (40, 0, 200, 17)
        dy = torch.randn(sum(counts), 384, device=device, generator=g).to(torch.bfloat16)
        x = torch.randn(sum(counts), 256, device=device, generator=g).to(torch.bfloat16)
        gq_t, gs, offs = quantize_token_runs(dy, counts)
        xq_t, xs, _ = quantize_token_runs(x, counts)
        got = _grouped_wgrad_kernel(gq_t, gs, xq_t, xs, offs)
        yield got, _emulate_grouped_wgrad(gq_t, gs, xq_t, xs, offs)  # the empty expert's zeros included

    return _agrees_with_emulation("grouped FP8 wgrad", "the bf16 wgrad", pairs)


def _agrees_with_emulation(kernel: str, fallback: str, pairs) -> bool:
    """True when every (kernel output, emulation) pair that `pairs()` yields agrees to the bf16 output's
    precision; otherwise (or if the kernel raises) logs why and that `fallback` is used instead."""
    try:
        for got, ref in pairs():
            err = (got.float() - ref).norm() / ref.norm()
            if not bool(err < 1e-2):  # bf16 output: ~2^-9 relative
                log.warning("%s disagrees with its emulation (rel err %.3g); using %s", kernel, float(err), fallback)
                return False
        return True
    except Exception as e:  # noqa: BLE001 -- any failure means: do not use it
        log.warning("%s unavailable (%s: %s); using %s", kernel, type(e).__name__, e, fallback)
        return False


def _emulate_rowwise(xq, xs, wq, ws, counts) -> torch.Tensor:
    """What :func:`_rowwise_grouped` computes, in float32 per expert (the probe's reference)."""
    out = torch.zeros(xq.shape[0], wq.shape[-2], dtype=torch.float32, device=xq.device)
    for e, s, t in _segments(counts):
        out[s:t] = (xq[s:t].float() * xs[s:t, None]) @ (wq[e].float() * ws[e][:, None]).T
    return out


def _probe_grouped(device: torch.device) -> bool:
    """Run the grouped kernel once on both orientations (forward [E, N, K] and dgrad [E, K, N] operands,
    an expert without tokens included) and compare with the emulation; False disables it."""

    def pairs():
        g = torch.Generator(device=device).manual_seed(0)
        counts = (40, 0, 200, 16)
        x = torch.randn(sum(counts), 256, device=device, generator=g)
        w = torch.randn(len(counts), 384, 256, device=device, generator=g)
        offs = _offsets(_device_counts(counts, device))
        for weight in (w, w.transpose(-2, -1)):
            xq, xs = quantize_rows(x if weight is w else torch.randn(sum(counts), 384, device=device, generator=g))
            wq, ws = quantize_rows(weight)
            yield _rowwise_grouped(xq, xs, wq, ws, offs), _emulate_rowwise(xq, xs, wq, ws, counts)

    return _agrees_with_emulation("grouped FP8 GEMM", "per-expert GEMMs", pairs)


def fp8_grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor | list[int] | tuple[int, ...],
    recipe: FP8Recipe = DEFAULT_RECIPE,
) -> torch.Tensor:
    """Rows of ``x`` [S, K], sorted by expert with ``counts[e]`` rows for expert ``e``, times ``weight[e].T``.

    ``weight`` is [E, N, K] (transformers' non-transposed layout). Differentiable in
    ``x`` and ``weight``. Runs torch's grouped FP8 GEMM where :func:`grouped_backend` says
    ``"rowwise"`` (shapes permitting: K and N multiples of 16), the per-expert block-scaled recipe otherwise.
    ``counts`` may be an integer tensor [E] on ``x``'s device: the rowwise path then never reads it on the
    host (nor checks that it sums to S); the blockwise path loops over experts on the host and reads it once.
    """
    if len(counts) != weight.shape[0]:
        raise ValueError(f"{len(counts)} counts for {weight.shape[0]} experts (weight {tuple(weight.shape)})")
    n, k = weight.shape[-2], weight.shape[-1]
    if n % 16 == 0 and k % 16 == 0 and grouped_backend(x.device, recipe) == "rowwise":
        if not isinstance(counts, torch.Tensor):
            _check_sum(counts, x)
        return _FP8GroupedRowwise.apply(x, weight, _device_counts(counts, x.device), recipe)
    counts = tuple(counts.tolist() if isinstance(counts, torch.Tensor) else (int(c) for c in counts))
    _check_sum(counts, x)
    return _FP8GroupedLinear.apply(x, weight, counts, recipe)


def _check_sum(counts, x: torch.Tensor) -> None:
    if sum(counts) != x.shape[0]:
        raise ValueError(f"counts {list(counts)} do not sum to the {x.shape[0]} rows of x")


@torch.compiler.disable  # runs eagerly inside a compiled block: see posttrain.fp8.linear.fp8_linear
def fp8_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward for transformers' ``@use_experts_implementation`` classes (DeepseekV3Experts): the
    routed experts' dispatch, SwiGLU and combine of :mod:`posttrain.routed_experts`, both projections in FP8."""
    if getattr(self, "has_bias", False) or getattr(self, "is_transposed", False):
        raise NotImplementedError("posttrain_fp8 experts support the non-transposed, bias-free layout only")
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("posttrain_fp8 experts do not handle expert-parallel sentinels")
    recipe: FP8Recipe = getattr(self, "fp8_recipe", DEFAULT_RECIPE)

    def linear(x: torch.Tensor, weight: torch.Tensor, counts) -> torch.Tensor:
        return fp8_grouped_linear(x, weight, counts, recipe)

    # the per-expert (blockwise) fallback loops on the host: one read of the counts for both projections
    blockwise = grouped_backend(hidden_states.device, recipe) == "blockwise"
    return experts_forward(self, hidden_states, top_k_index, top_k_weights, linear,
                           kernels=fused_routing_usable(hidden_states), groups=torch.Tensor.tolist if blockwise else None)


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
