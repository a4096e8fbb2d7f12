"""The routed experts' SwiGLU gating, silu(gate) · up, as one Triton kernel each way.

DeepSeek-V3's experts are SwiGLU FFNs (report §2.1.2, after Shazeer 2020). transformers gates the output of the
fused up-projection, [gate | up] per row, in eager ops: `act_fn(gate) * up` is a silu kernel and a product
forward, and in the backward two products, silu's backward and a concatenation of the two halves' gradients: 36
bytes per gated element in bf16 (benchmarks/count_experts_traffic.py). The kernels here read gate and up once and
write the product (6 bytes), and in the backward read dy, gate and up once and write both halves of the gradient
into one buffer (10 bytes), recomputing the sigmoid. Each rounds once from fp32 (within half a bf16 step of the
exact value); the eager ops round silu(gate) to bf16 before the product (within one step), so the two are within
1.5 bf16 steps of each other.

:mod:`posttrain.routed_experts` decides where they run (its start-up check covers them too).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install may lack Triton: the eager ops run
    triton = None
    tl = None
else:
    from .triton_rounding import round_to_bf16

if triton is not None:

    @triton.jit
    def _silu_mul_kernel(h_ptr, out_ptr, inter, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
        """out[r, c] = silu(h[r, c]) · h[r, inter + c] in fp32, rounded once."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        gate = tl.load(h_ptr + row * 2 * inter + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * inter + inter + cols, mask=m, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up  # silu as torch writes it: x / (1 + exp(-x))
        if OUT_BF16:
            y = round_to_bf16(y)
        tl.store(out_ptr + row * inter + cols, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_backward_kernel(dy_ptr, h_ptr, dh_ptr, inter, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
        """dh[r, c] = dy · up · silu'(gate) and dh[r, inter + c] = dy · silu(gate), in fp32, each rounded once."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        gate = tl.load(h_ptr + row * 2 * inter + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * inter + inter + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * inter + cols, mask=m, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-gate))
        d_up = dy * (gate * s)
        d_gate = dy * up * (s * (1.0 + gate * (1.0 - s)))  # silu'(x) = s (1 + x (1 - s)), torch's silu_backward
        if OUT_BF16:
            d_up = round_to_bf16(d_up)
            d_gate = round_to_bf16(d_gate)
        tl.store(dh_ptr + row * 2 * inter + cols, d_gate.to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dh_ptr + row * 2 * inter + inter + cols, d_up.to(dh_ptr.dtype.element_ty), mask=m)


_BLOCK = 1024


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """[S, 2I] -> [S, I]: silu(h[:, :I]) · h[:, I:] by the Triton kernel, differentiable."""
    return _SiluMul.apply(h)


def silu_mul_reference(h: torch.Tensor) -> torch.Tensor:
    """transformers' eager gating (integrations/moe.py `_default_apply_gate` with SiLU)."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    """The forward kernel on a contiguous [S, 2I]: [S, I]."""
    out = torch.empty(h.shape[0], h.shape[1] // 2, dtype=h.dtype, device=h.device)
    _launch(_silu_mul_kernel, h, out)
    return out


def swiglu_backward(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The backward kernel: the gradient of a contiguous [S, 2I] ``h`` from ``dy`` [S, I]."""
    dh = torch.empty_like(h)
    _launch(_silu_mul_backward_kernel, h, dh, dy.contiguous())
    return dh


def _launch(kernel, h: torch.Tensor, out: torch.Tensor, *extra: torch.Tensor) -> None:
    rows, inter = h.shape[0], h.shape[1] // 2
    if rows and inter:
        kernel[(rows, triton.cdiv(inter, _BLOCK))](*extra, h, out, inter, OUT_BF16=out.dtype == torch.bfloat16,
                                                   BLOCK=_BLOCK, num_warps=4)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor):
        if h.dim() != 2 or h.shape[1] % 2:
            raise ValueError(f"silu_mul takes [rows, 2 * inter], got {tuple(h.shape)}")
        h = h.contiguous()
        ctx.save_for_backward(h)
        return swiglu_forward(h)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (h,) = ctx.saved_tensors
        return swiglu_backward(dy, h)
