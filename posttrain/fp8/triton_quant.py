"""Triton kernels for the tile / block FP8 quantizers of :mod:`posttrain.fp8.quant` (one pass over memory).

One kernel covers every layout the training path quantizes (DeepSeek-V3 report §3.3.2 groups):

* activations in 1x128 tiles and weights in 128x128 blocks (``kind="groups"``);
* the transpose of a tensor in 1x128 tiles, read in place (``"groups_t"``: the wgrad's dY^T);
* an fp8 tensor in 1x128 tiles re-tiled to its transpose in 1x128 tiles (``"requant_t"``: the wgrad's
  X^T, report §3.5.2), which dequantizes with the input's scales on the fly.

Each program loads a ``[BLOCK_R, GROUP_C]`` tile of the (possibly transposed) view in float32, takes the
group max-abs, and writes the fp8 values and their float32 scale. The results equal
:func:`posttrain.fp8.quant.quantize_groups_reference` bit for bit: the divisions are IEEE round-to-nearest
(``div_rn``), and the rounding to e4m3 is done explicitly in float32 (:func:`_round_to_e4m3`), so the final
cast only converts values that e4m3 holds exactly -- hardware ``cvt`` or Triton's CPU interpreter give the
same bits. Shapes the kernel does not cover (a group width that is not a power of two, e.g. row-wise
scales over 7168 channels) return None and the caller falls back to the compiled or eager quantizer.

On a CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` before this module is imported),
which is how the tests check them against the reference without a GPU.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install may lack Triton; quant_backend() then never picks this backend
    triton = None
    tl = None

__all__ = ["available", "quantize"]

FP8_MAX = 448.0
_FP32_TINY = torch.finfo(torch.float32).tiny
_MAX_TILE_ELEMS = 16384  # a 128x128 weight block; larger groups go to the compiled quantizer


def available() -> bool:
    """True when Triton is importable (the kernels are defined)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _round_to_e4m3(y):
        """Round float32 ``y`` (|y| <= 448) to the nearest e4m3fn value, ties to even, sign kept (also of -0)."""
        bits = y.to(tl.int32, bitcast=True)
        sign = bits & -2147483648  # 0x80000000
        mag_bits = bits & 0x7FFFFFFF
        a = mag_bits.to(tl.float32, bitcast=True)
        # normals (>= 2^-6): keep 3 of float32's 23 mantissa bits, round half to even on bit 20
        normal = ((mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        # subnormals (< 2^-6) are multiples of 2^-9: adding 2^14 (float32 ulp 2^-9 there) rounds to one, ties to even
        sub = (a + 16384.0) - 16384.0
        r = tl.where(a >= 0.015625, normal, sub)
        return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _scale_of(amax, UE8M0: tl.constexpr):
        """compute_scale_inv: amax / 448 (IEEE), clamped to the smallest normal, 1 for an all-zero group,
        rounded up to a power of two for UE8M0."""
        s = tl.maximum(tl.math.div_rn(amax, 448.0), 1.1754943508222875e-38)
        s = tl.where(amax > 0, s, 1.0)
        if UE8M0:
            s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        return s

    @triton.jit
    def _quant_tiles_kernel(
        x_ptr, in_s_ptr, q_ptr, s_ptr,
        R, C,
        sx_b, sx_r, sx_c,
        sis_b, sis_r, sis_c,
        sq_b, sq_r, sq_c,
        ss_b, ss_r, ss_c,
        BLOCK_R: tl.constexpr, GROUP_R: tl.constexpr, GROUP_C: tl.constexpr,
        HAS_IN_SCALE: tl.constexpr, IN_TILE_R: tl.constexpr, IN_TILE_C: tl.constexpr,
        UE8M0: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c.to(tl.int64) * GROUP_C + tl.arange(0, GROUP_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_r + cols[None, :] * sx_c, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_IN_SCALE:  # requant_t: dequantize with the input's own tile scales first
            si = tl.load(in_s_ptr + b * sis_b + (rows[:, None] // IN_TILE_R) * sis_r
                         + (cols[None, :] // IN_TILE_C) * sis_c, mask=mask, other=0.0)
            x = x * si
        a = tl.abs(x)
        if GROUP_R == 1:  # one group per row of the tile
            s = _scale_of(tl.max(a, axis=1), UE8M0)
            y = tl.math.div_rn(x, s[:, None])
            tl.store(s_ptr + b * ss_b + rows * ss_r + pid_c * ss_c, s, mask=rows < R)
        else:  # BLOCK_R == GROUP_R: the whole tile is one group
            s = _scale_of(tl.max(tl.max(a, axis=1), axis=0), UE8M0)
            y = tl.math.div_rn(x, s)
            tl.store(s_ptr + b * ss_b + pid_r * ss_r + pid_c * ss_c, s)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        q = _round_to_e4m3(y).to(tl.float8e4nv)
        tl.store(q_ptr + b * sq_b + rows[:, None] * sq_r + cols[None, :] * sq_c, q, mask=mask)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _supported(group_r: int, group_c: int) -> bool:
    return _pow2(group_c) and 16 <= group_c <= 1024 and _pow2(group_r) and group_r * group_c <= _MAX_TILE_ELEMS


def quantize(
    kind: str, a: int, b: int, scale_fmt: str | None, *tensors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The quantizer ``kind`` ("groups", "groups_t", "requant_t") on ``tensors``, as
    :func:`posttrain.fp8.quant._reference` defines it but with the fp8 cropped to the quantized shape
    (row-major). None when this kernel does not cover the group shape."""
    if kind == "requant_t":
        q_in, s_in = tensors
        view, group, in_scale = q_in.t(), (1, a), s_in
    elif kind in ("groups", "groups_t"):
        x = tensors[0]
        view, group, in_scale = (x if kind == "groups" else x.transpose(-2, -1)), (a, b), None
    else:
        raise ValueError(f"unknown quantizer kind {kind!r}")
    group_r, group_c = group
    if not _supported(group_r, group_c):
        return None
    lead, (rows, cols) = tuple(view.shape[:-2]), tuple(view.shape[-2:])
    v = view.reshape(-1, rows, cols)  # a view for the layouts used here (contiguous lead dims)
    n = v.shape[0]
    q = torch.empty(n, rows, cols, dtype=torch.float8_e4m3fn, device=v.device)
    s = torch.empty(n, math.ceil(rows / group_r), math.ceil(cols / group_c), dtype=torch.float32, device=v.device)
    if in_scale is not None:
        # element (r = k, c = m) of the transposed view uses s_in[m, k // a]
        in_args, in_strides, in_tiles = in_scale, (0, in_scale.stride(1), in_scale.stride(0)), (a, 1)
    else:
        in_args, in_strides, in_tiles = v, (0, 0, 0), (1, 1)
    if group_r == 1:
        # a transposed view is read down its columns: enough rows for 128-byte segments (64 bf16, 128 fp8)
        block_r = max(32, 128 // v.element_size()) if v.stride(-2) == 1 else 32
    else:
        block_r = group_r
    warps = 8 if block_r * group_c >= 8192 else 4
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, group_c), n)
    _quant_tiles_kernel[grid](
        v, in_args, q, s,
        rows, cols,
        *v.stride(), *in_strides, *q.stride(), *s.stride(),
        BLOCK_R=block_r, GROUP_R=group_r, GROUP_C=group_c,
        HAS_IN_SCALE=in_scale is not None, IN_TILE_R=in_tiles[0], IN_TILE_C=in_tiles[1],
        UE8M0=scale_fmt == "ue8m0",
        num_warps=warps,
    )
    return q.reshape(*lead, rows, cols), s.reshape(*lead, *s.shape[-2:])
