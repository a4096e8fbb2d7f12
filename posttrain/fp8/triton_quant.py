"""Triton kernels for the tile / block FP8 quantizers of :mod:`posttrain.fp8.quant` (one pass over memory).

One kernel covers the tile and block layouts the training path quantizes (DeepSeek-V3 report §3.3.2 groups):

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
same bits. NaN and infinity too: the max-abs and the clamp are integer ops on the bits (a float max or min
skips a NaN on sm_90), so a group holding a NaN gets the reference's scale 1 and the NaN stays fp8 NaN.
Row-wise scales (one per row of 7168 or 2048 channels, what torch's grouped FP8 GEMM takes), the grouped
wgrad's per-expert token runs, and the two operands an FP8 linear makes of one activation-side tensor
(:func:`quantize_both`: X and X^T in the forward, dY and dY^T in the backward, from one read) have a kernel
each. Group shapes none of them covers (a group width that is not a power of two and not a whole row) return
None: the caller falls back to the compiled or eager quantizer.

On a CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` before this module is imported),
which is how the tests check them against the reference without a GPU.
"""

from __future__ import annotations

import math

import torch

# None without Triton: quant_backend() then never picks this backend
from ..triton_rounding import tl, triton

__all__ = ["available", "in_place", "quantize", "quantize_both", "quantize_token_runs"]

# The kernels spell out the constants of posttrain.fp8.quant: 448 (e4m3's largest value), float32(1/448)
# and float32's smallest normal, 1.1754943508222875e-38.
_MAX_TILE_ELEMS = 16384  # a 128x128 weight block; larger groups go to the compiled quantizer


def available() -> bool:
    """True when Triton is importable (the kernels are defined)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _round_to_e4m3(y):
        """Clamp float32 ``y`` to ±448 and round it to the nearest e4m3fn value, ties to even, sign kept (also of -0
        and of NaN). A NaN stays NaN, as a float32 NaN the final cast writes as fp8 NaN."""
        bits = y.to(tl.int32, bitcast=True)
        sign = bits & -2147483648  # 0x80000000
        abs_bits = bits & 0x7FFFFFFF
        # the clamp, on the magnitude's bits (ordered as the magnitudes): a float min / max would return the operand
        # that is not NaN (sm_90's min.f32 / max.f32, the interpreter's np.fmax), turning a NaN into -448
        mag_bits = tl.minimum(abs_bits, 0x43E00000)  # 448.0
        a = mag_bits.to(tl.float32, bitcast=True)
        # normals (>= 2^-6): keep 3 of float32's 23 mantissa bits, round half to even on bit 20
        normal = ((mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        # subnormals (< 2^-6) are multiples of 2^-9: adding 2^14 (float32 ulp 2^-9 there) rounds to one, ties to even
        sub = (a + 16384.0) - 16384.0
        r = tl.where(a >= 0.015625, normal, sub).to(tl.int32, bitcast=True)
        # NaN (a magnitude above infinity's bits): 0x7FF00000, which the hardware's cvt (any NaN -> 0x7F, as
        # cuda_fp8.h's emulation of it) and the interpreter's cast (mantissa 111, no round bit -> 0x7F | sign)
        # both write as fp8 NaN. On a GPU the quotient's NaN is the canonical one (positive): 0x7F, as torch's
        # division and cast on CUDA give; in the interpreter NumPy keeps the sign, as torch on a CPU does.
        r = tl.where(abs_bits > 0x7F800000, 0x7FF00000, r)
        return (r | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _to_e4m3(x, s):
        """fp8 of ``x / s``: IEEE division (as torch's), clamped to ±448, rounded to e4m3 ties to even, cast."""
        return _round_to_e4m3(tl.math.div_rn(x, s)).to(tl.float8e4nv)

    @triton.jit
    def _abs_bits(x):
        """float32 ``|x|`` as int32 bits. Their order is the magnitudes' and every NaN's lies above infinity's, so
        an integer max of them is the reference's max-abs, NaN where the group holds a NaN: a float max would
        skip it (tl.max, sm_90's max.f32, the interpreter's np.nanmax), leaving the group a finite scale."""
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF

    @triton.jit
    def _scale_of(amax_bits, UE8M0: tl.constexpr):
        """compute_scale_inv of a max-abs given as :func:`_abs_bits`: amax * float32(1/448), clamped to the
        smallest normal, 1 for an all-zero group or a NaN max-abs (``amax > 0`` is false for both, as in the
        reference), rounded up to a power of two for UE8M0."""
        amax = amax_bits.to(tl.float32, bitcast=True)
        s = tl.maximum(amax * 0.0022321428571428570, 1.1754943508222875e-38)
        s = tl.where(amax > 0, s, 1.0)
        if UE8M0:
            s_bits = (s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000
            # an infinite max-abs: the reference's frexp(inf) has exponent 0, so its power of two is 1
            s = tl.where(s_bits == 0x7F800000, 1.0, s_bits.to(tl.float32, bitcast=True))
        return s

    # Triton compiles a kernel per "specialization" of its int arguments: whether each is 1 and whether it
    # is divisible by 16, not its value. So a token count that changes from step to step (packed rows,
    # routing) costs at most a second compile (the first count not divisible by 16), never one per width.
    # The other dim's size (n_other: the token count when the output is transposed, i.e. the row length of
    # the fp8 X^T / dY^T the wgrad takes) is specialized like the rest: divisible by 16 -- always, for rows
    # padded to 128 tokens (posttrain.fp8.training.fp8_row_multiple) -- lets the transposed tile be stored in
    # vectors instead of byte by byte. The in-scale strides stay unspecialized (they may be a token count;
    # those loads are one per column). The batch stride (0 for one matrix, fixed for a weight stack) and the
    # row stride stay specialized: with an unknown batch offset or row stride no load could be vectorized.
    @triton.jit(do_not_specialize=["sis_b", "sis_r", "sis_c", "ss_c"])
    def _quant_tiles_kernel(
        x_ptr, in_s_ptr, q_ptr, s_ptr,
        n_contig, n_other,
        sx_b, sx_other,
        sis_b, sis_r, sis_c,
        ss_r, ss_c,
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
            if IN_TILE_R == BLOCK_R and IN_TILE_C == 1:  # one input tile per column of this tile: a vector
                si = tl.load(in_s_ptr + b * sis_b + pid_r * sis_r + cols * sis_c, mask=cols < n_cols, other=0.0)
                x = x * si[None, :]
            else:
                si = tl.load(in_s_ptr + b * sis_b + (rows[:, None] // IN_TILE_R) * sis_r
                             + (cols[None, :] // IN_TILE_C) * sis_c, mask=mask, other=0.0)
                x = x * si
        a = _abs_bits(x)
        n_scale_cols = tl.cdiv(n_cols, GROUP_C)
        s_base = s_ptr + b * tl.cdiv(n_rows, GROUP_R) * n_scale_cols
        if GROUP_R == 1:  # one group per row of the tile; scales at (ss_r, ss_c) strides
            s = _scale_of(tl.max(a, axis=1), UE8M0)
            q = _to_e4m3(x, s[:, None])
            tl.store(s_base + rows * ss_r + pid_c * ss_c, s, mask=rows < n_rows)
        else:  # BLOCK_R == GROUP_R: the whole tile is one group
            s = _scale_of(tl.max(tl.max(a, axis=1), axis=0), UE8M0)
            q = _to_e4m3(x, s)
            tl.store(s_base + pid_r * n_scale_cols + pid_c, s)
        tl.store(q_ptr + b * n_rows * n_cols + rows[:, None] * n_cols + cols[None, :], q, mask=mask)

    # Both operands one activation-side tensor feeds, from one read of it (a launch and a pass over memory fewer
    # per FP8 linear, both ways). x [R, C] (tokens x channels, contiguous channels) goes out in 1xTILE tiles along
    # C (the forward's X, the dgrad's dY) and, transposed, in 1xTILE tiles along R (the wgrad's X^T and dY^T:
    # 128x1 tiles of x). REQUANT quantizes the transpose from the fp8 tiles just made, dequantized -- the report's
    # 1x128 -> 128x1 conversion of the cached activation (§3.5.2) -- and otherwise from x itself (dY^T). Each
    # program owns one TILE x TILE tile, which holds every group of both outputs that it touches. Both scale grids
    # are written column-major, F.scaled_mm's layout for them. Masked entries load as zeros: a partial row or
    # column group then has the reference's zero padding, and a zero row requantizes to zeros.
    @triton.jit
    def _quant_both_kernel(
        x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr,
        n_rows, n_cols, sx_r,
        TILE: tl.constexpr, REQUANT: tl.constexpr, EVEN_COLS: tl.constexpr, UE8M0: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r.to(tl.int64) * TILE + tl.arange(0, TILE)
        cols = pid_c.to(tl.int64) * TILE + tl.arange(0, TILE)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        mask = row_ok[:, None] if EVEN_COLS else row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * sx_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _scale_of(tl.max(_abs_bits(x), axis=1), UE8M0)
        q = _to_e4m3(x, s[:, None])
        tl.store(s_ptr + pid_c * n_rows + rows, s, mask=row_ok)
        tl.store(q_ptr + rows[:, None] * n_cols + cols[None, :], q, mask=mask)
        if REQUANT:  # dequantize as the reference does: fp8 -> float32, times the tile's scale
            v = q.to(tl.float32) * s[:, None]
        else:
            v = x
        st = _scale_of(tl.max(_abs_bits(v), axis=0), UE8M0)
        tl.store(st_ptr + pid_r * n_cols + cols, st, mask=col_ok)
        tl.store(qt_ptr + cols[None, :] * n_rows + rows[:, None], _to_e4m3(v, st[None, :]), mask=mask)

    # Row-wise scales (one per row over all its columns, e.g. 7168): torch's grouped FP8 GEMM takes these.
    # A row is too long for one tile, so each program walks its rows twice: max-abs, then quantize.
    @triton.jit(do_not_specialize=["n_rows"])
    def _quant_rows_kernel(
        x_ptr, q_ptr, s_ptr,
        n_rows, n_cols, sx_b, sx_r,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UE8M0: tl.constexpr,
    ):
        b = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        x_base = x_ptr + b * sx_b + rows[:, None] * sx_r
        amax = tl.zeros([BLOCK_R], dtype=tl.int32)  # _abs_bits
        for c0 in range(0, n_cols, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(x_base + cols[None, :], mask=row_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(_abs_bits(x.to(tl.float32)), axis=1))
        s = _scale_of(amax, UE8M0)
        tl.store(s_ptr + b * n_rows + rows, s, mask=row_ok)
        q_base = q_ptr + b * n_rows * n_cols + rows[:, None] * n_cols
        for c0 in range(0, n_cols, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = row_ok[:, None] & (cols < n_cols)[None, :]
            x = tl.load(x_base + cols[None, :], mask=m, other=0.0)
            tl.store(q_base + cols[None, :], _to_e4m3(x.to(tl.float32), s[:, None]), mask=m)

    # Row-wise scales of W^T, read from W [n, R, C] in place: one scale per column of W over its R entries, the fp8
    # W^T [n, C, R] written row-major (the grouped dgrad's operand, rebuilt at every optimizer step for every
    # expert stack). Each program walks a strip of BLOCK_C columns down the rows twice (max-abs, then quantize),
    # loading [BLOCK_R, BLOCK_C] tiles along W's contiguous dim; Triton re-lays each tile out for the
    # transposed store. Before, W^T was first copied to a contiguous bf16 tensor for the row-wise kernel.
    @triton.jit
    def _quant_rows_t_kernel(
        x_ptr, q_ptr, s_ptr,
        n_rows, n_cols, sx_b,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UE8M0: tl.constexpr,
    ):
        b = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        x_base = x_ptr + b * sx_b + cols[None, :]
        amax = tl.zeros([BLOCK_C], dtype=tl.int32)  # _abs_bits
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = (rows < n_rows)[:, None] & col_ok[None, :]
            x = tl.load(x_base + rows[:, None] * n_cols, mask=m, other=0.0)
            amax = tl.maximum(amax, tl.max(_abs_bits(x.to(tl.float32)), axis=0))
        s = _scale_of(amax, UE8M0)
        tl.store(s_ptr + b * n_cols + cols, s, mask=col_ok)
        q_base = q_ptr + b * n_rows * n_cols + cols[None, :] * n_rows
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = (rows < n_rows)[:, None] & col_ok[None, :]
            x = tl.load(x_base + rows[:, None] * n_cols, mask=m, other=0.0)
            tl.store(q_base + rows[:, None], _to_e4m3(x.to(tl.float32), s[None, :]), mask=m)

    # The grouped wgrad's operands (posttrain.fp8.experts.quantize_token_runs): tokens sorted by expert, one
    # scale per (expert, channel) over the expert's run of tokens, written transposed ([C, S_pad]) with each
    # run zero-padded. One program per (expert, 128 channels): a pass over the run for the max-abs, a pass
    # that quantizes and writes. Run lengths are read on the device, so nothing here depends on the host.
    # n_pad (the padded token total, the output's row length) is a multiple of 16 by construction: specialized,
    # it lets the transposed tile be stored in vectors, and it never causes a second compile.
    # With HAS_IN_SCALE, ``t`` is fp8 with one scale per token (the row-wise FP8 activation cache) and is
    # dequantized on the fly, as one float32 product per element: the wgrad's X^T runs come from the cached
    # FP8 X without a high-precision copy of it.
    @triton.jit
    def _token_runs_kernel(
        t_ptr, in_s_ptr, starts_ptr, counts_ptr, pstarts_ptr, plens_ptr, q_ptr, s_ptr,
        n_cols, n_pad, stride_t,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, UE8M0: tl.constexpr, RUN_ALIGN: tl.constexpr,
        HAS_IN_SCALE: tl.constexpr,
    ):
        e = tl.program_id(0)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        start = tl.load(starts_ptr + e)
        count = tl.load(counts_ptr + e)
        pstart = tl.multiple_of(tl.load(pstarts_ptr + e), RUN_ALIGN)  # runs start RUN_ALIGN-aligned
        plen = tl.multiple_of(tl.load(plens_ptr + e), RUN_ALIGN)  # and span whole multiples of it
        amax = tl.zeros([BLOCK_C], dtype=tl.int32)  # _abs_bits
        for r0 in range(0, count, BLOCK_T):
            rows = r0 + tl.arange(0, BLOCK_T)
            m = (rows < count)[:, None] & col_ok[None, :]
            x = tl.load(t_ptr + (start + rows)[:, None] * stride_t + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_IN_SCALE:
                x = x * tl.load(in_s_ptr + start + rows, mask=rows < count, other=0.0)[:, None]
            amax = tl.maximum(amax, tl.max(_abs_bits(x), axis=0))
        s = _scale_of(amax, UE8M0)
        tl.store(s_ptr + e * n_cols + cols, s, mask=col_ok)
        for r0 in range(0, plen, BLOCK_T):  # the run and its zero padding
            rows = r0 + tl.arange(0, BLOCK_T)
            m = (rows < count)[:, None] & col_ok[None, :]
            x = tl.load(t_ptr + (start + rows)[:, None] * stride_t + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_IN_SCALE:
                x = x * tl.load(in_s_ptr + start + rows, mask=rows < count, other=0.0)[:, None]
            q = _to_e4m3(x, s[None, :])
            tl.store(q_ptr + cols[None, :] * n_pad + (pstart + rows)[:, None], q,
                     mask=(rows < plen)[:, None] & col_ok[None, :])


def _cdiv(a: int, b: int) -> int:
    # plain ints: triton.cdiv is a jit function, and calling it from Python costs microseconds per launch
    return -(-a // b)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _supported(group_r: int, group_c: int) -> bool:
    return _pow2(group_c) and 16 <= group_c <= 1024 and _pow2(group_r) and group_r * group_c <= _MAX_TILE_ELEMS


def _row_wise(kind: str, group_r: int, group_c: int, x: torch.Tensor) -> bool:
    """One group per whole row of ``x``: the row-wise kernels' case (groups of 7168 or 2048 channels)."""
    return kind == "groups" and group_r == 1 and group_c >= x.shape[-1]


def in_place(kind: str, group_r: int, group_c: int, x: torch.Tensor) -> bool:
    """Whether :func:`quantize` takes ``x`` whole: one launch that reads it where it is, with no copy of it in
    high precision (so no chunking is needed to bound memory). Offsets are 64-bit: any size is fine."""
    if _row_wise(kind, group_r, group_c, x):  # W, or W^T read from W
        return x.is_contiguous() or _rows_of_transpose(x)
    return x.is_contiguous() and _supported(group_r, group_c)


def _rows_of_transpose(x: torch.Tensor) -> bool:
    """``x`` is the transpose of a contiguous stack (W^T of an expert stack W), each matrix under 2^31 elements."""
    return x.dim() >= 2 and x.transpose(-2, -1).is_contiguous() and x.shape[-1] * x.shape[-2] < 2**31


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
    if _row_wise(kind, group_r, group_c, view):
        return _quantize_rows(view, scale_fmt)
    if not _supported(group_r, group_c):
        return None
    lead, (rows, cols) = tuple(view.shape[:-2]), tuple(view.shape[-2:])
    v = view.reshape(-1, rows, cols)  # a view for the layouts used here (contiguous lead dims)
    transposed = v.stride(-2) == 1 and v.stride(-1) != 1
    if not transposed and v.stride(-1) != 1:
        v = v.contiguous()
    n = v.shape[0]
    q = torch.empty(n, rows, cols, dtype=torch.float8_e4m3fn, device=v.device)
    s_rows, s_cols = math.ceil(rows / group_r), math.ceil(cols / group_c)
    if group_r == 1 and n == 1:
        # 1x128 tiles of one matrix (the GEMMs' activation-side operands): scales column-major, the layout
        # F.scaled_mm takes for them (posttrain.fp8.gemm.scaled_mm_operands), so no GEMM copies them
        s = torch.empty_strided((1, s_rows, s_cols), (s_rows * s_cols, 1, s_rows), dtype=torch.float32, device=v.device)
    else:
        s = torch.empty(n, s_rows, s_cols, dtype=torch.float32, device=v.device)
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
    grid = (_cdiv(rows, block_r), _cdiv(cols, group_c), n)
    _quant_tiles_kernel[grid](
        v, in_args, q, s,
        n_contig, n_other,
        v.stride(0) if n > 1 else 0, sx_other,
        *in_strides,
        s.stride(1), s.stride(2),
        TRANSPOSED=transposed, EVEN_CONTIG=n_contig % (block_r if transposed else group_c) == 0,
        BLOCK_R=block_r, GROUP_R=group_r, GROUP_C=group_c,
        HAS_IN_SCALE=in_scale is not None, IN_TILE_R=in_tiles[0], IN_TILE_C=in_tiles[1],
        UE8M0=scale_fmt == "ue8m0",
        num_warps=warps,
    )
    return q.reshape(*lead, rows, cols), s.reshape(*lead, *s.shape[-2:])


def quantize_both(
    x: torch.Tensor, tile: int, scale_fmt: str | None, requantize: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """``x`` [R, C] in 1 x ``tile`` tiles and its transpose [C, R] in 1 x ``tile`` tiles, in one launch (see
    ``_quant_both_kernel``); None when the kernel does not cover ``x`` (not one matrix with contiguous rows, or
    a tile that is not a power of two from 16 to 128)."""
    if x.dim() != 2 or x.stride(-1) != 1 or not (_pow2(tile) and 16 <= tile <= 128):
        return None
    rows, cols = x.shape
    rb, cb = _cdiv(rows, tile), _cdiv(cols, tile)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty_strided((rows, cb), (1, rows), dtype=torch.float32, device=x.device)
    qt = torch.empty(cols, rows, dtype=torch.float8_e4m3fn, device=x.device)
    st = torch.empty_strided((cols, rb), (1, cols), dtype=torch.float32, device=x.device)
    _quant_both_kernel[(rb, cb)](
        x, q, s, qt, st, rows, cols, x.stride(0),
        TILE=tile, REQUANT=requantize, EVEN_COLS=cols % tile == 0, UE8M0=scale_fmt == "ue8m0",
        # a 128x128 float32 tile and its fp8 forms live in registers: with 4 warps ptxas spills (sm_90), with 8
        # it takes 165-239 registers a thread, with 16 95-125 and twice the loads in flight per SM
        num_warps=16,
    )
    return (q, s), (qt, st)


def quantize_token_runs(
    t: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor, padded_starts: torch.Tensor,
    padded: torch.Tensor, rows: int, scale_fmt: str | None, align: int = 16, row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` [S, C] sorted by expert, in the padded layout :func:`posttrain.fp8.experts._run_layout` gives
    (run ``e``: ``counts[e]`` tokens from ``starts[e]``, ``padded[e]`` rows from ``padded_starts[e]``, ``rows``
    in all) -> (q [C, rows] fp8 row-major, scales [E*C]); the rows past the last run are written as zeros.
    Every ``padded_starts[e]`` and ``rows`` must be multiples of ``align`` (the layout's run alignment).
    ``row_scale`` [S] float32: ``t`` is fp8 and stands for ``t.float() * row_scale[:, None]``."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    n_cols, n_exp = t.shape[1], counts.shape[0]
    plens = padded.clone()
    plens[-1:] = rows - padded_starts[-1:]  # the last program also zeroes the tail
    q = torch.empty(n_cols, rows, dtype=torch.float8_e4m3fn, device=t.device)
    s = torch.empty(n_exp, n_cols, dtype=torch.float32, device=t.device)
    block_c = 128
    _token_runs_kernel[(n_exp, _cdiv(n_cols, block_c))](
        t, t if row_scale is None else row_scale, starts, counts, padded_starts, plens, q, s,
        n_cols, rows, t.stride(0),
        BLOCK_T=64, BLOCK_C=block_c, UE8M0=scale_fmt == "ue8m0", RUN_ALIGN=align, HAS_IN_SCALE=row_scale is not None,
        num_warps=4,
    )
    return q, s.reshape(-1)


def _quantize_rows(x: torch.Tensor, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row of the last two dims: (fp8 like x, scales [..., rows, 1])."""
    lead, (rows, cols) = tuple(x.shape[:-2]), tuple(x.shape[-2:])
    if x.stride(-1) != 1 and _rows_of_transpose(x):
        return _quantize_rows_of_transpose(x, scale_fmt)
    v = x.reshape(-1, rows, cols)
    if v.stride(-1) != 1:
        v = v.contiguous()
    n = v.shape[0]
    q = torch.empty(n, rows, cols, dtype=torch.float8_e4m3fn, device=v.device)
    s = torch.empty(n, rows, 1, dtype=torch.float32, device=v.device)
    block_r = 4
    _quant_rows_kernel[(_cdiv(rows, block_r), n)](
        v, q, s, rows, cols, v.stride(0) if n > 1 else 0, v.stride(1),
        BLOCK_R=block_r, BLOCK_C=1024, UE8M0=scale_fmt == "ue8m0", num_warps=4,
    )
    return q.reshape(*lead, rows, cols), s.reshape(*lead, rows, 1)


def _quantize_rows_of_transpose(xt: torch.Tensor, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise quantization of ``xt = W.transpose(-2, -1)`` (W contiguous) without a copy of W^T: (fp8 [..., C, R]
    row-major, scales [..., C, 1])."""
    w = xt.transpose(-2, -1)
    lead, (n_rows, n_cols) = tuple(w.shape[:-2]), tuple(w.shape[-2:])
    v = w.reshape(-1, n_rows, n_cols)  # a view: w is contiguous
    n = v.shape[0]
    q = torch.empty(n, n_cols, n_rows, dtype=torch.float8_e4m3fn, device=v.device)
    s = torch.empty(n, n_cols, 1, dtype=torch.float32, device=v.device)
    block_c = 64
    _quant_rows_t_kernel[(_cdiv(n_cols, block_c), n)](
        v, q, s, n_rows, n_cols, v.stride(0) if n > 1 else 0,
        BLOCK_R=64, BLOCK_C=block_c, UE8M0=scale_fmt == "ue8m0", num_warps=4,
    )
    return q.reshape(*lead, n_cols, n_rows), s.reshape(*lead, n_cols, 1)
