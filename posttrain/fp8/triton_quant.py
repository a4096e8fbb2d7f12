"""Triton kernels for the tile / block FP8 quantizers of :mod:`posttrain.fp8.quant` (one pass over memory).

One kernel covers every layout the training path quantizes (DeepSeek-V3 report §3.3.2 groups):

* activations in 1x128 tiles and weights in 128x128 blocks (``kind="groups"``);
* the transpose of a tensor in 1x128 tiles, read in place (``"groups_t"``: the wgrad's dY^T);
* an fp8 tensor in 1x128 tiles re-tiled to its transpose in 1x128 tiles (``"requant_t"``: the wgrad's
  X^T, report §3.5.2), which dequantizes with the input's scales on the fly.

Each program loads a ``[BLOCK_R, GROUP_C]`` tile of the (possibly transposed) view in float32, takes the
group max-abs, and writes the fp8 values and their float32 scale. The results equal
:func:`posttrain.fp8.quant.quantize_groups_reference` bit for bit: scales are ``amax * float32(1/448)`` as
there, the element divisions are IEEE round-to-nearest (``div_rn``, like torch's tensor division on CPU and
CUDA), and the rounding to e4m3 is done explicitly in float32 (:func:`_round_to_e4m3`), so the final
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
        """compute_scale_inv: amax * float32(1/448), clamped to the smallest normal, 1 for an all-zero group,
        rounded up to a power of two for UE8M0."""
        s = tl.maximum(amax * 0.0022321428571428570, 1.1754943508222875e-38)
        s = tl.where(amax > 0, s, 1.0)
        if UE8M0:
            s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        return s

    # The token count differs from step to step (packed rows, routing), and Triton compiles a kernel per
    # "specialization" of its int arguments (== 1, divisible by 16). So every argument that can depend on
    # the token count is left unspecialized: the kernel compiles once per layer shape and dtype, never
    # mid-run. The contiguous input dim's size and the other dim's stride (the hidden size, the same every
    # step) stay specialized, which is what lets the loads vectorize.
    @triton.jit(do_not_specialize=["n_other", "sx_b", "sis_b", "sis_r", "sis_c"])
    def _quant_tiles_kernel(
        x_ptr, in_s_ptr, q_ptr, s_ptr,
        n_contig, n_other,
        sx_b, sx_other,
        sis_b, sis_r, sis_c,
        TRANSPOSED: tl.constexpr, EVEN_CONTIG: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_R: tl.constexpr, GROUP_C: tl.constexpr,
        HAS_IN_SCALE: tl.constexpr, IN_TILE_R: tl.constexpr, IN_TILE_C: tl.constexpr,
        UE8M0: tl.constexpr,
    ):
        """Quantize the [R, C] matrix ``b`` of a batch view in (GROUP_R, GROUP_C) groups. Its contiguous
        dim (stride 1) is the columns, or the rows when TRANSPOSED; outputs are row-major [R, C] fp8 and
        [ceil(R / GROUP_R), ceil(C / GROUP_C)] float32 scales."""
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        if TRANSPOSED:
            n_rows, n_cols = n_contig, n_other
        else:
            n_rows, n_cols = n_other, n_contig
        rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c.to(tl.int64) * GROUP_C + tl.arange(0, GROUP_C)
        # the contiguous dim's mask only where its size leaves a partial tile, so that loads vectorize
        row_ok = rows[:, None] < n_rows
        col_ok = cols[None, :] < n_cols
        if TRANSPOSED:
            offs = rows[:, None] + cols[None, :] * sx_other
            mask = col_ok if EVEN_CONTIG else row_ok & col_ok
        else:
            offs = rows[:, None] * sx_other + cols[None, :]
            mask = row_ok if EVEN_CONTIG else row_ok & col_ok
        x = tl.load(x_ptr + b * sx_b + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_IN_SCALE:  # requant_t: dequantize with the input's own tile scales first
            si = tl.load(in_s_ptr + b * sis_b + (rows[:, None] // IN_TILE_R) * sis_r
                         + (cols[None, :] // IN_TILE_C) * sis_c, mask=mask, other=0.0)
            x = x * si
        a = tl.abs(x)
        n_scale_cols = tl.cdiv(n_cols, GROUP_C)
        s_base = s_ptr + b * tl.cdiv(n_rows, GROUP_R) * n_scale_cols
        if GROUP_R == 1:  # one group per row of the tile
            s = _scale_of(tl.max(a, axis=1), UE8M0)
            y = tl.math.div_rn(x, s[:, None])
            tl.store(s_base + rows * n_scale_cols + pid_c, s, mask=rows < n_rows)
        else:  # BLOCK_R == GROUP_R: the whole tile is one group
            s = _scale_of(tl.max(tl.max(a, axis=1), axis=0), UE8M0)
            y = tl.math.div_rn(x, s)
            tl.store(s_base + pid_r * n_scale_cols + pid_c, s)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        q = _round_to_e4m3(y).to(tl.float8e4nv)
        tl.store(q_ptr + b * n_rows * n_cols + rows[:, None] * n_cols + cols[None, :], q, mask=mask)


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
    transposed = v.stride(-2) == 1 and v.stride(-1) != 1
    if not transposed and v.stride(-1) != 1:
        v = v.contiguous()
    n = v.shape[0]
    q = torch.empty(n, rows, cols, dtype=torch.float8_e4m3fn, device=v.device)
    s = torch.empty(n, math.ceil(rows / group_r), math.ceil(cols / group_c), dtype=torch.float32, device=v.device)
    if group_r == 1:
        # a transposed view is read down its columns: enough rows for 128-byte segments (64 bf16, 128 fp8)
        block_r = max(32, 128 // v.element_size()) if transposed else 32
    else:
        block_r = group_r
    n_contig, n_other = (rows, cols) if transposed else (cols, rows)
    sx_other = v.stride(-1) if transposed else v.stride(-2)
    if in_scale is not None:
        # element (r = k, c = m) of the transposed view uses s_in[m, k // a]
        in_args, in_strides, in_tiles = in_scale, (0, in_scale.stride(1), in_scale.stride(0)), (a, 1)
    else:
        in_args, in_strides, in_tiles = v, (0, 0, 0), (1, 1)
    warps = 8 if block_r * group_c >= 8192 else 4
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, group_c), n)
    _quant_tiles_kernel[grid](
        v, in_args, q, s,
        n_contig, n_other,
        v.stride(0) if n > 1 else 0, sx_other,
        *in_strides,
        TRANSPOSED=transposed, EVEN_CONTIG=n_contig % (block_r if transposed else group_c) == 0,
        BLOCK_R=block_r, GROUP_R=group_r, GROUP_C=group_c,
        HAS_IN_SCALE=in_scale is not None, IN_TILE_R=in_tiles[0], IN_TILE_C=in_tiles[1],
        UE8M0=scale_fmt == "ue8m0",
        num_warps=warps,
    )
    return q.reshape(*lead, rows, cols), s.reshape(*lead, *s.shape[-2:])
