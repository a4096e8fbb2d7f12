"""The SwiGLU gating, silu(gate) · up, as one Triton kernel each way: for the routed experts and the MLPs.

DeepSeek-V3's FFNs are SwiGLU (report §2.1.2, after Shazeer 2020): the routed experts, the shared experts and
the dense layers' MLPs. transformers gates in eager ops: `act_fn(gate) * up` is a silu kernel and a product
forward, and in the backward two products and silu's backward (the routed experts also concatenate the two
halves' gradients): 28–36 bytes per gated element in bf16 (benchmarks/count_experts_traffic.py), and the silu
output is kept for the backward. The kernels here read gate and up once and write the product (6 bytes), and in
the backward read dy, gate and up once and write both gradients (10 bytes), recomputing the sigmoid. Each rounds
once from fp32 (within half a bf16 step of the exact value); the eager ops round silu(gate) to bf16 before the
product (within one step), so the two are within 1.5 bf16 steps of each other.

* The routed experts gate the halves [gate | up] of one grouped GEMM's output (:func:`silu_mul`);
  :mod:`posttrain.routed_experts` decides where, and its start-up check covers this kernel too.
* The shared experts and the dense MLPs (`DeepseekV3MLP`: gate_proj, up_proj, down_proj) gate two GEMMs'
  outputs (:func:`silu_mul_pair`): the model swaps `DeepseekV3MLP` for :class:`DeepseekV3FusedMLP`, which
  runs the kernels on CUDA (not compiling, `POSTTRAIN_FUSED_SWIGLU` not "0", after its start-up check) and
  transformers' forward everywhere else.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

from .start_up_check import passed_on, rounded_once_bound, run_start_up_check, swap_module_class

from .triton_rounding import round_to_bf16, tl, triton  # None without Triton: the eager ops run

log = logging.getLogger(__name__)

FUSED_SWIGLU_ENV = "POSTTRAIN_FUSED_SWIGLU"  # "0" keeps transformers' eager MLP gating on every device
FUSED_DEVICE_TYPES = ("cuda",)  # where the MLPs run the kernels (the tests add "cpu" under Triton's interpreter)
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)
_checked: dict[str, str | None] = {}  # device -> None (the start-up check passed) or what went wrong

if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, inter, in_stride, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
        """out[r, c] = silu(gate[r, c]) · up[r, c] in fp32, rounded once (gate and up rows ``in_stride`` apart)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        gate = tl.load(gate_ptr + row * in_stride + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * in_stride + cols, mask=m, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up  # silu as torch writes it: x / (1 + exp(-x))
        if OUT_BF16:
            y = round_to_bf16(y)
        tl.store(out_ptr + row * inter + cols, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_backward_kernel(dy_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, inter, in_stride, out_stride,
                                  OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
        """d_gate = dy · up · silu'(gate) and d_up = dy · silu(gate), in fp32, each rounded once."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        gate = tl.load(gate_ptr + row * in_stride + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * in_stride + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * inter + cols, mask=m, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-gate))
        d_up = dy * (gate * s)
        d_gate = dy * up * (s * (1.0 + gate * (1.0 - s)))  # silu'(x) = s (1 + x (1 - s)), torch's silu_backward
        if OUT_BF16:
            d_up = round_to_bf16(d_up)
            d_gate = round_to_bf16(d_gate)
        tl.store(d_gate_ptr + row * out_stride + cols, d_gate.to(d_gate_ptr.dtype.element_ty), mask=m)
        tl.store(d_up_ptr + row * out_stride + cols, d_up.to(d_up_ptr.dtype.element_ty), mask=m)


_BLOCK = 1024


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """[S, 2I] -> [S, I]: silu(h[:, :I]) · h[:, I:] by the Triton kernel, differentiable (one gradient buffer)."""
    return _SiluMul.apply(h)


def silu_mul_pair(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for two tensors of one shape [..., I] by the Triton kernel, differentiable."""
    return _SiluMulPair.apply(gate, up)


def silu_mul_reference(h: torch.Tensor) -> torch.Tensor:
    """transformers' eager gating (integrations/moe.py `_default_apply_gate` with SiLU)."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The forward kernel on [S, I] views with unit column stride and one row stride: [S, I], contiguous."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch(_silu_mul_kernel, gate, up, out)
    return out


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, d_gate: torch.Tensor,
                    d_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel: writes the gradients of ``gate`` and ``up`` ([S, I] views as in :func:`swiglu_forward`)
    from ``dy`` [S, I] into ``d_gate`` and ``d_up`` (views of one row stride), and returns them."""
    _launch(_silu_mul_backward_kernel, gate, up, d_gate, d_up, dy=dy.contiguous())
    return d_gate, d_up


def _launch(kernel, gate: torch.Tensor, up: torch.Tensor, *out: torch.Tensor, dy: torch.Tensor | None = None) -> None:
    rows, inter = gate.shape
    if gate.stride() != up.stride() or gate.stride(1) != 1 or any(o.stride() != out[0].stride() for o in out):
        raise ValueError(f"swiglu kernels take views of one row stride and unit column stride, got {gate.stride()}, "
                         f"{up.stride()} and {[o.stride() for o in out]}")
    if rows and inter:
        strides = (gate.stride(0),) if dy is None else (gate.stride(0), out[0].stride(0))
        head = () if dy is None else (dy,)
        kernel[(rows, triton.cdiv(inter, _BLOCK))](*head, gate, up, *out, inter, *strides,
                                                   OUT_BF16=out[0].dtype == torch.bfloat16, BLOCK=_BLOCK, num_warps=4)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor):
        if h.dim() != 2 or h.shape[1] % 2:
            raise ValueError(f"silu_mul takes [rows, 2 * inter], got {tuple(h.shape)}")
        h = h.contiguous()
        ctx.save_for_backward(h)
        inter = h.shape[1] // 2
        return swiglu_forward(h[:, :inter], h[:, inter:])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (h,) = ctx.saved_tensors
        inter = h.shape[1] // 2
        dh = torch.empty_like(h)
        swiglu_backward(dy, h[:, :inter], h[:, inter:], dh[:, :inter], dh[:, inter:])
        return dh


class _SiluMulPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        if gate.shape != up.shape:
            raise ValueError(f"silu_mul_pair takes two tensors of one shape, got {tuple(gate.shape)}, {tuple(up.shape)}")
        shape = gate.shape
        gate, up = gate.reshape(-1, shape[-1]).contiguous(), up.reshape(-1, shape[-1]).contiguous()
        ctx.save_for_backward(gate, up)
        ctx.shape = shape
        return swiglu_forward(gate, up).view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        swiglu_backward(dy.reshape(gate.shape), gate, up, d_gate, d_up)
        return d_gate.view(ctx.shape), d_up.view(ctx.shape)


# -- the MLPs ----------------------------------------------------------------------------------------------
class DeepseekV3FusedMLP(DeepseekV3MLP):
    """`DeepseekV3MLP` (same parameters, same state-dict keys) whose gating runs as one Triton kernel each way
    where :func:`fused_swiglu_usable`; transformers' forward everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act_fn) not in (SiLUActivation, nn.SiLU) or not fused_swiglu_usable(x):
            return super().forward(x)
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype not in _KERNEL_DTYPES or up.dtype != gate.dtype:
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(silu_mul_pair(gate, up))


def fused_swiglu_usable(x: torch.Tensor) -> bool:
    """True where the MLPs run the SwiGLU kernels for inputs like ``x``: CUDA, not compiling, not switched off,
    and the start-up check on the device passed."""
    if (torch.compiler.is_compiling() or triton is None or x.device.type not in FUSED_DEVICE_TYPES
            or os.environ.get(FUSED_SWIGLU_ENV, "1") == "0"):
        return False
    return passed_on(x.device, _checked, lambda d: run_start_up_check(compare_with_float64, d),
                     "the fused SwiGLU gating", "using transformers' eager MLP there", log)


def use_fused_mlp(model: nn.Module) -> int:
    """Makes every `DeepseekV3MLP` of ``model`` (dense layers, shared experts) a `DeepseekV3FusedMLP` in place:
    the subclass adds no state, so parameters, hooks and state-dict keys stay. Returns how many changed."""
    return swap_module_class(model, DeepseekV3MLP, DeepseekV3FusedMLP)


# -- exact values and the start-up check -----------------------------------------------------------------
def swiglu_error_bounds(h: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(exact y, its bound, exact dh, its bound) for :func:`silu_mul` on ``h`` = [gate | up], ``dy`` (float64).
    Before the final rounding each value is its fp32 formula: an exp, a division and a few products, each off by
    a few 2^-24 on a GPU (approximate exp and division): 64·2^-24 of the magnitude of the terms covers them. A GPU's
    exp is 2^(x·log2 e) (``ex2.approx``), and rounding x·log2 e moves the result by up to |x|·2^-24 relative
    (log2 e · ln 2 = 1), which grows with the gate: hence (64 + |gate|)·2^-24."""
    gate, up = h.chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    y = gate * s * up
    d_gate_terms = (dy * up * s).abs() * (1 + (gate * (1 - s)).abs())
    d_gate = dy * up * s * (1 + gate * (1 - s))
    d_up = dy * gate * s
    fp32 = (64 + gate.abs()) * 2.0**-24
    dh = torch.cat([d_gate, d_up], dim=-1)
    return (y, rounded_once_bound(y, fp32 * y.abs(), dtype), dh,
            rounded_once_bound(dh, torch.cat([fp32, fp32], dim=-1) * torch.cat([d_gate_terms, d_up.abs()], dim=-1), dtype))


def compare_with_float64(device: torch.device) -> str | None:
    """Both forms (the halves of one tensor, two tensors) on ``device`` against float64, forward and backward, on
    gate values from -20 to 20 and an intermediate size that is not a power of two. None if within the bounds."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(42, 2 * 150, generator=g, dtype=torch.float64) * 4).clamp(-20, 20).to(device, torch.bfloat16)
    gy = torch.randn(42, 150, generator=g, dtype=torch.float64).to(device, torch.bfloat16)
    y64, y_bound, dh64, dh_bound = swiglu_error_bounds(h.double().cpu(), gy.double().cpu(), torch.bfloat16)
    halves = h.clone().requires_grad_(True)
    gate, up = (t.clone().requires_grad_(True) for t in h.chunk(2, dim=-1))
    for form, y, inputs in (("halves", silu_mul(halves), (halves,)), ("pair", silu_mul_pair(gate, up), (gate, up))):
        dh = torch.cat(torch.autograd.grad(y, inputs, gy), dim=-1)
        if not ((y.detach().double().cpu() - y64).abs() <= y_bound).all():
            return f"SwiGLU forward ({form}) beyond its bound"
        if not ((dh.double().cpu() - dh64).abs() <= dh_bound).all():
            return f"SwiGLU backward ({form}) beyond its bound"
    return None
