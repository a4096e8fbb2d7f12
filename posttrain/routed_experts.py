"""The routed experts' token dispatch and weighted combine, and the experts forward built on them.

DeepSeek-V3 (report §2.1.2) sends each token to K routed experts and adds their outputs weighted by the
normalized gating values: h'_t = u_t + Σ_j g_{t,j} FFN_{i_j}(u_t) (+ the shared expert). A grouped GEMM wants
the T·K (token, expert) pairs sorted by expert, so the layer copies each token's hidden state into its K
expert-sorted rows (*dispatch*) and, after the experts, sums each token's K output rows with their gating
values (*combine*).

transformers' `grouped_mm` experts combine in eager ops: the expert-sorted output times the fp32 gating
values (an fp32 copy of every routed row), a gather back to token order, the sum over K and a cast; the
backward materializes zeros for the gathers and multiplies again, and the dispatch's backward accumulates
into bf16 through `index_put_`. With the SwiGLU gating that is 31 kernels and 109 bytes per routed element
(token × top-k × hidden) outside the grouped GEMMs of a Moonlight-sized layer; with the kernels below, 14 kernels
and 22 bytes (`benchmarks/count_experts_traffic.py`, RESULTS.md sessions 16 and 17). On CUDA two Triton kernels do the
routing:

* `_sum_rows_kernel`: out[t] = Σ_j w[t, j] · rows[slot[t, j]], in fp32 and rounded once. It is the
  combine's forward and, with unit weights, the dispatch's backward (a fixed-order sum: deterministic);
* `_sum_rows_backward_kernel`, one program per token: the rows' gradient w[t, j] · dy[t] and the gating
  values' gradient <dy[t], rows[slot[t, j]]>, reading dy[t] once.

The dispatch's forward stays one gather (one read, one write). Between the two grouped GEMMs the SwiGLU
gating is one kernel each way too (:mod:`posttrain.swiglu`). Everywhere else -- the CPU, under
torch.compile (whose generated kernels fuse the eager ops themselves), with `POSTTRAIN_FUSED_MOE_ROUTING=0`,
or where the kernels fail their start-up check on a device -- the same functions run the eager ops, and
the bf16 experts are transformers' own `grouped_mm_experts_forward`, unchanged.

Numerics. The combine's value is transformers' (fp32 products and sum, one rounding at the end) up to the
order of the K fp32 additions; the rows' gradient is the same bits (one fp32 product, rounded once); the
gating values' gradient is an fp32 dot product over the hidden size in another order; the dispatch's
backward sums the K rows in fp32 and rounds once, where `index_put_` rounded after each addition.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate, grouped_mm_experts_forward

from .start_up_check import combine_error_bound, passed_on, rounded_once_bound, run_start_up_check
from .swiglu import compare_with_float64 as compare_swiglu_with_float64
from .swiglu import silu_mul

from .triton_rounding import round_to_bf16, tl, triton  # None without Triton: the eager ops run

log = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "posttrain_grouped"  # the name registered in transformers' ExpertsInterface
FUSED_ROUTING_ENV = "POSTTRAIN_FUSED_MOE_ROUTING"  # "0" keeps the eager ops on every device
FUSED_DEVICE_TYPES = ("cuda",)  # where the Triton kernels run (the tests add "cpu" under Triton's interpreter)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_checked: dict[str, str | None] = {}  # device -> None (the start-up check passed) or what went wrong


# -- routing ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Routing:
    """One layer's T·K token-expert pairs sorted by expert (stably: one expert's pairs keep token order)."""

    order: torch.Tensor  # [T·K]: the pair (t·K + j) at each expert-sorted row
    slots: torch.Tensor  # [T, K]: the expert-sorted row of each pair (the inverse permutation of `order`)
    counts: torch.Tensor  # [E] int64: rows per expert, on the device (no host sync)

    @property
    def top_k(self) -> int:
        return self.slots.shape[1]


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """Sorts the pairs of ``top_k_index`` [T, K] by expert, on the device, with no host sync."""
    expert_ids = top_k_index.reshape(-1).long()
    order = torch.argsort(expert_ids, stable=True)
    # integer scatter_add_ is exact (deterministic on CUDA under torch.use_deterministic_algorithms); bincount
    # and histc on integers would read the maximum back to the host or reject int64 on the CPU
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
    slots = torch.empty_like(order)
    slots[order] = torch.arange(order.numel(), device=order.device)
    return Routing(order, slots.view(top_k_index.shape), counts)


def dispatch(hidden_states: torch.Tensor, routing: Routing, kernels: bool) -> torch.Tensor:
    """[T, H] -> [T·K, H]: each token's hidden state at its K expert-sorted rows."""
    token_of_row = routing.order // routing.top_k
    if kernels:
        return _Dispatch.apply(hidden_states, token_of_row, routing.slots)
    return hidden_states[token_of_row]


def combine(rows: torch.Tensor, routing: Routing, weights: torch.Tensor, out_dtype: torch.dtype,
            kernels: bool) -> torch.Tensor:
    """[T·K, H] expert-sorted rows -> [T, H]: each token's K rows times its gating values ``weights`` [T, K], summed.

    The eager ops are transformers' (integrations/moe.py, 5.19): the product in the promoted dtype (fp32 with
    the router's fp32 gating values), the sum over K, one cast to ``out_dtype``."""
    if kernels:
        return _Combine.apply(rows, routing.slots, weights, out_dtype)
    tokens, top_k = routing.slots.shape
    weighted = rows * weights.reshape(-1)[routing.order].unsqueeze(-1)
    return weighted[routing.slots.reshape(-1)].view(tokens, top_k, -1).sum(dim=1).to(out_dtype)


def fused_routing_usable(x: torch.Tensor) -> bool:
    """True where the Triton dispatch/combine kernels run for activations like ``x`` (device, dtype, not
    compiling, not switched off) and passed their start-up check on its device."""
    if (triton is None or x.device.type not in FUSED_DEVICE_TYPES or x.dtype not in _KERNEL_DTYPES
            or os.environ.get(FUSED_ROUTING_ENV, "1") == "0" or torch.compiler.is_compiling()):
        return False
    return passed_on(x.device, _checked, _start_up_check, "the fused MoE routing (dispatch, SwiGLU, combine)",
                     "using the eager ops there", log)


# -- the experts forward ---------------------------------------------------------------------------------
GroupedLinear = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, grouped_linear: GroupedLinear, *, kernels: bool,
                    groups: Callable[[torch.Tensor], object] | None = None) -> torch.Tensor:
    """The routed experts of a transformers experts module (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I],
    not transposed, no bias): dispatch, ``grouped_linear(x, weight, groups)`` for each projection with the gating
    in between, combine. ``groups(counts)`` makes what ``grouped_linear`` takes for the expert groups from the
    rows per expert (a device tensor), once for both projections; by default the counts themselves."""
    routing = route(top_k_index, module.num_experts)
    counts = groups(routing.counts) if groups is not None else routing.counts
    x = dispatch(hidden_states, routing, kernels)
    has_gate = getattr(module, "has_gate", True)
    h = grouped_linear(x, module.gate_up_proj if has_gate else module.up_proj, counts)
    if kernels and has_gate and gates_with_default_swiglu(module):
        h = silu_mul(h)
    else:
        h = module._apply_gate(h) if has_gate else module.act_fn(h)
    out = grouped_linear(h, module.down_proj, counts)
    return combine(out, routing, top_k_weights, hidden_states.dtype, kernels)


def gates_with_default_swiglu(module: nn.Module) -> bool:
    """True when ``module`` gates as transformers' default does with SiLU: ``silu(gate) * up`` on the halves
    [gate | up] of the fused up-projection, which :func:`posttrain.swiglu.silu_mul` computes."""
    return (getattr(type(module), "_apply_gate", None) is _default_apply_gate
            and getattr(module, "is_concatenated", True)
            and type(getattr(module, "act_fn", None)) in (SiLUActivation, nn.SiLU))


def _bf16_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # as transformers' _grouped_linear (not transposed): the input in the weight's dtype, [S, in] @ [E, in, out]
    return F.grouped_mm(x.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)


def _group_offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0, dtype=torch.int32)  # F.grouped_mm's groups: each expert's end row


def fused_grouped_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """``"posttrain_grouped"``: transformers' ``grouped_mm`` experts with the fused dispatch, SwiGLU and combine
    where :func:`fused_routing_usable`; transformers' ``grouped_mm_experts_forward`` itself everywhere else."""
    if (not hasattr(F, "grouped_mm") or getattr(self, "has_bias", False) or getattr(self, "is_transposed", False)
            or getattr(self, "_is_expert_parallel", False) or not fused_routing_usable(hidden_states)):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return experts_forward(self, hidden_states, top_k_index, top_k_weights, _bf16_grouped_linear, kernels=True,
                           groups=_group_offsets)


def register_fused_experts() -> None:
    """Registers ``"posttrain_grouped"`` in transformers' ``ExpertsInterface`` (idempotent)."""
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, fused_grouped_experts_forward)


def use_fused_experts(model: nn.Module) -> bool:
    """Where ``model``'s config asks for transformers' ``grouped_mm`` experts (its default), asks for
    ``"posttrain_grouped"`` instead: the same function on the CPU, the fused routing kernels on CUDA. Other
    choices (``eager``, ``posttrain_fp8``, ...) are left alone. The choice is a private config attribute that
    ``save_pretrained`` does not write. Returns whether it changed."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_experts_implementation", None) != "grouped_mm":
        return False
    register_fused_experts()
    config._experts_implementation = EXPERTS_IMPLEMENTATION
    return True


# -- the kernels -----------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _sum_rows_kernel(rows_ptr, slot_ptr, w_ptr, out_ptr, H, K: tl.constexpr, KP: tl.constexpr,
                         HAS_W: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[t, cols] = Σ_j w[t, j] · rows[slot[t, j], cols] (w = 1 without HAS_W), fp32, rounded once."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        j = tl.arange(0, KP)
        jm = j < K
        rows = tl.load(slot_ptr + t * K + j, mask=jm, other=0).to(tl.int64)
        cm = cols < H
        x = tl.load(rows_ptr + rows[:, None] * H + cols[None, :], mask=jm[:, None] & cm[None, :], other=0.0)
        x = x.to(tl.float32)
        if HAS_W:
            x = x * tl.load(w_ptr + t * K + j, mask=jm, other=0.0).to(tl.float32)[:, None]
        acc = tl.sum(x, axis=0)
        if OUT_BF16:
            acc = round_to_bf16(acc)
        tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cm)

    @triton.jit
    def _sum_rows_backward_kernel(dy_ptr, rows_ptr, slot_ptr, w_ptr, d_rows_ptr, dw_ptr, H, K: tl.constexpr,
                                  KP: tl.constexpr, NEED_DW: tl.constexpr, D_ROWS_BF16: tl.constexpr,
                                  DW_BF16: tl.constexpr, BLOCK_H: tl.constexpr):
        """One token t: d_rows[slot[t, j]] = w[t, j] · dy[t] (rounded once) and dw[t, j] = <dy[t], rows[slot[t, j]]>."""
        t = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, KP)
        jm = j < K
        rows = tl.load(slot_ptr + t * K + j, mask=jm, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * K + j, mask=jm, other=0.0).to(tl.float32)
        dots = tl.zeros([KP], dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            cm = cols < H
            m = jm[:, None] & cm[None, :]
            dy = tl.load(dy_ptr + t * H + cols, mask=cm, other=0.0).to(tl.float32)
            g = w[:, None] * dy[None, :]
            if D_ROWS_BF16:
                g = round_to_bf16(g)
            tl.store(d_rows_ptr + rows[:, None] * H + cols[None, :], g.to(d_rows_ptr.dtype.element_ty), mask=m)
            if NEED_DW:
                x = tl.load(rows_ptr + rows[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
                dots += tl.sum(x * dy[None, :], axis=1)
        if NEED_DW:
            if DW_BF16:
                dots = round_to_bf16(dots)
            tl.store(dw_ptr + t * K + j, dots.to(dw_ptr.dtype.element_ty), mask=jm)


def _block(hidden: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(hidden))


def sum_rows(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = Σ_j weights[t, j] · rows[slots[t, j]] (unit weights if None) by the Triton kernel: [T, H]."""
    rows, slots = rows.contiguous(), slots.contiguous()
    tokens, top_k = slots.shape
    hidden = rows.shape[1]
    out = torch.empty(tokens, hidden, dtype=out_dtype, device=rows.device)
    if tokens == 0 or hidden == 0:
        return out
    block = _block(hidden, 1024)
    w = weights.contiguous() if weights is not None else slots  # a placeholder the kernel never reads
    _sum_rows_kernel[(tokens, triton.cdiv(hidden, block))](
        rows, slots, w, out, hidden, K=top_k, KP=triton.next_power_of_2(top_k), HAS_W=weights is not None,
        OUT_BF16=out_dtype == torch.bfloat16, BLOCK_H=block, num_warps=4)
    return out


def sum_rows_backward(dy: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                      need_dw: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients of :func:`sum_rows` with weights: (d_rows [T·K, H] in rows' dtype, d_weights [T, K] or None)."""
    dy, rows, slots, weights = dy.contiguous(), rows.contiguous(), slots.contiguous(), weights.contiguous()
    tokens, top_k = slots.shape
    hidden = rows.shape[1]
    d_rows = torch.empty_like(rows)  # every row is some pair's: all of it is written
    dw = torch.empty_like(weights) if need_dw else None
    if tokens == 0 or hidden == 0:
        return d_rows, (dw.zero_() if dw is not None else None)
    _sum_rows_backward_kernel[(tokens,)](
        dy, rows, slots, weights, d_rows, dw if dw is not None else weights, hidden, K=top_k,
        KP=triton.next_power_of_2(top_k), NEED_DW=need_dw, D_ROWS_BF16=rows.dtype == torch.bfloat16,
        DW_BF16=weights.dtype == torch.bfloat16, BLOCK_H=_block(hidden, 512), num_warps=4)
    return d_rows, dw


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, token_of_row: torch.Tensor, slots: torch.Tensor):
        ctx.save_for_backward(slots)
        ctx.dtype = hidden_states.dtype
        return hidden_states.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, d_rows: torch.Tensor):
        (slots,) = ctx.saved_tensors
        return sum_rows(d_rows, slots, None, ctx.dtype), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype):
        ctx.save_for_backward(rows, slots, weights)
        return sum_rows(rows, slots, weights, out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, slots, weights = ctx.saved_tensors
        d_rows, dw = sum_rows_backward(dy, rows, slots, weights, need_dw=ctx.needs_input_grad[2])
        return (d_rows if ctx.needs_input_grad[0] else None), None, dw, None


# -- the start-up check ----------------------------------------------------------------------------------
def _start_up_check(device: torch.device) -> str | None:
    """The kernels on ``device`` against float64 on rows of very different scales, 6 pairs per token and a
    hidden size that is not a power of two. None if they agree, else what went wrong."""
    return run_start_up_check(_compare_with_float64, device)


def _compare_with_float64(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(0)
    tokens, top_k, hidden = 7, 6, 200
    rows64 = torch.randn(tokens * top_k, hidden, generator=g, dtype=torch.float64)
    rows64 *= 10.0 ** torch.randint(-2, 3, (tokens * top_k, 1), generator=g)
    rows = rows64.to(device, torch.bfloat16)
    slots = torch.randperm(tokens * top_k, generator=g).view(tokens, top_k).to(device)
    weights = torch.rand(tokens, top_k, generator=g, dtype=torch.float64).to(device, torch.float32)
    dy = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).to(device, torch.bfloat16)
    out = sum_rows(rows, slots, weights, torch.bfloat16)
    d_rows, dw = sum_rows_backward(dy, rows, slots, weights)
    x = rows.double().cpu()[slots.cpu()]  # [T, K, H]
    w, gy = weights.double().cpu(), dy.double().cpu()
    terms = x * w.unsqueeze(-1)
    exact = terms.sum(1)
    if not ((out.double().cpu() - exact).abs() <= combine_error_bound(terms.abs().sum(1), exact, top_k, torch.bfloat16)).all():
        return "combine forward beyond its fp32 error bound"
    unit = sum_rows(rows, slots, None, torch.bfloat16).double().cpu()  # the dispatch's backward
    if not ((unit - x.sum(1)).abs() <= combine_error_bound(x.abs().sum(1), x.sum(1), top_k, torch.bfloat16)).all():
        return "unweighted sum beyond its fp32 error bound"
    want_rows = torch.empty_like(rows)
    want_rows[slots.reshape(-1)] = (dy.float().unsqueeze(1) * weights.unsqueeze(-1)).to(torch.bfloat16).reshape(-1, hidden)
    if not torch.equal(d_rows, want_rows):
        return "rows' gradient differs from w·dy rounded once"
    prods = x * gy.unsqueeze(1)
    exact_dw = prods.sum(-1)
    if not ((dw.double().cpu() - exact_dw).abs() <= combine_error_bound(prods.abs().sum(-1), exact_dw, hidden, torch.float32)).all():
        return "gating values' gradient beyond its fp32 error bound"
    return compare_swiglu_with_float64(device)  # the SwiGLU gating between the grouped GEMMs
