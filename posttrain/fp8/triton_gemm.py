"""A Triton block-scaled FP8 GEMM, ``A [M, K] @ B [N, K]^T``: the second candidate beside cuBLAS's for the thin
V3 shapes.

Each program accumulates its output tile over K in blocks of 128: the fp8 product of one block, from the tensor
cores, is scaled by A's and B's group scales and added to a float32 accumulator. That is the report's
promotion of partial sums to CUDA cores at an interval of N_C = 128 elements (DeepSeek-V3 report §3.3.2,
"Increasing Accumulation Precision"), with the scales of the fine-grained groups applied at the same time.
A takes 1x128 tiles; B takes 128x128 blocks (a weight) or 1x128 tiles (the wgrad's X^T).

Why a second kernel: cuBLAS's block-scaled kernel (``F.scaled_mm``, :mod:`posttrain.fp8.gemm`) ran at
1060-1230 TF/s on seven of the nine V3 shapes on an H100, but at 0.81x of bf16 on kv_a_proj (576 output
columns: 160 tiles of 128x128 for 132 SMs) and 1.32x on kv_b_proj (K = 512: four K blocks per tile)
(benchmarks/RESULTS.md, session 11). Here the tiles follow the shape (64 rows; 64 columns when N <= 1024),
so a thin GEMM still fills the SMs. **Its speed has not been measured**: :mod:`posttrain.fp8.gemm` takes it
only when ``POSTTRAIN_FP8_GEMM=triton``, and ``benchmarks/bench_gpu.py`` times it beside cuBLAS on the nine
shapes, which is what a default would be chosen from.

Operands come as :class:`~posttrain.fp8.gemm.BlockQuantized` (any strides, no padding needed: partial tiles are
masked) or as the :class:`~posttrain.fp8.gemm.ScaledMMOperandB` a weight keeps for the step (its K-major copy
and torch's scale layout, read through their strides). The product is within the float32 bound of
:func:`~posttrain.fp8.gemm.reference_gemm_nt`. On a CPU the kernel runs under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check it.
"""

from __future__ import annotations

import os

import torch

from ..triton_rounding import round_to_bf16, tl, triton

TILE = 128  # the K block: DeepSeek's group width and the promotion interval N_C
DEVICE_TYPES = ("cuda",)  # where the kernel runs compiled


def available(device: torch.device) -> bool:
    """True when Triton is importable and runs on ``device``: CUDA, or CPU tensors under its interpreter."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and (device.type in DEVICE_TYPES or interpreted)


def tile_config(m: int, n: int, k: int) -> dict:
    """Tile sizes for an [m, k] x [n, k]^T product. 64-row tiles throughout; 64-column tiles for thin outputs
    (N <= 1024: kv_a's 576 makes 9 column tiles, not 4.5), so the grid covers the SMs several times over; a
    deeper software pipeline for long contractions. A starting point, not tuned on a GPU yet."""
    return dict(BLOCK_M=64, BLOCK_N=64 if n <= 1024 else 128, GROUP_M=8, num_warps=4, num_stages=4 if k >= 4096 else 3)


if triton is not None:

    @triton.jit
    def _block_scaled_gemm_kernel(
        a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_sam, stride_sak, stride_sbn, stride_sbk,
        B_ROWS_PER_SCALE: tl.constexpr,  # 128: one scale per 128x128 block of B; 1: one per row and K block
        ROUND_BF16: tl.constexpr,  # bf16 output: round to nearest even here (the interpreter's cast truncates)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        BLOCK_K: tl.constexpr = 128
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        # GROUP_M row tiles in a row take the same B columns one after the other: B stays in L2
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        rm = rm.to(tl.int64)  # row offsets past 2^31 elements: a 65536-token output of kv_b's 32768 columns
        rn = rn.to(tl.int64)
        a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rn[None, :] * stride_bn + rk[:, None] * stride_bk
        sa_ptrs = sa_ptr + rm * stride_sam
        sb_ptrs = sb_ptr + (rn // B_ROWS_PER_SCALE) * stride_sbn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = rk < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            sa = tl.load(sa_ptrs + kb * stride_sak, mask=m_ok, other=0.0)
            sb = tl.load(sb_ptrs + kb * stride_sbk, mask=n_ok, other=0.0)
            # §3.3.2: this block's partial product leaves the tensor cores and is scaled into the fp32 sum
            acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if ROUND_BF16:
            acc = round_to_bf16(acc)
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemm_nt(a, b, out_dtype: torch.dtype = torch.float32, config: dict | None = None) -> torch.Tensor:
    """``dequant(a) @ dequant(b)^T`` with ``a`` in 1x128 tiles and ``b`` a ``BlockQuantized`` (128x128 blocks or
    1x128 tiles, any view) or a prepared ``ScaledMMOperandB``; the result in ``out_dtype`` (bf16 and fp32 are
    written by the kernel, others cast after). ``config`` overrides :func:`tile_config` (the benchmark's sweep)."""
    from .gemm import BlockQuantized, ScaledMMOperandB

    if a.group != (1, TILE):
        raise ValueError(f"A must come in 1x{TILE} tiles, got {a.group}")
    m, k = a.data.shape
    if isinstance(b, ScaledMMOperandB):
        from torch.nn.functional import ScalingType

        n, b_data = b.n, b.mat_b.t()  # [N_pad, K_pad], K-major: the copy the weight made for the step
        if b.scale_recipe_b == ScalingType.BlockWise128x128:  # [L4, N/128], strides (1, L4)
            rows_per_scale, sb, (sb_n, sb_k) = TILE, b.scale_b, (b.scale_b.stride(1), b.scale_b.stride(0))
        else:  # [N_pad, K/128], outer-dim-major
            rows_per_scale, sb, (sb_n, sb_k) = 1, b.scale_b, (b.scale_b.stride(0), b.scale_b.stride(1))
    elif isinstance(b, BlockQuantized):
        if b.group not in ((1, TILE), (TILE, TILE)):
            raise ValueError(f"B must come in 1x{TILE} tiles or {TILE}x{TILE} blocks, got {b.group}")
        n, b_data, rows_per_scale, sb = b.data.shape[0], b.data, b.group[0], b.scale_inv
        sb_n, sb_k = sb.stride(0), sb.stride(1)
    else:
        raise TypeError(f"B must be BlockQuantized or ScaledMMOperandB, got {type(b).__name__}")
    if b_data.shape[1] < k:
        raise ValueError(f"A has {k} columns, B {b_data.shape[1]}")
    kernel_out = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    out = torch.empty(m, n, dtype=kernel_out, device=a.data.device)
    if m == 0 or n == 0:
        return out.to(out_dtype)
    cfg = config or tile_config(m, n, k)
    sa = a.scale_inv
    grid = (-(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"]),)
    _block_scaled_gemm_kernel[grid](
        a.data, b_data, out, sa, sb, m, n, k,
        a.data.stride(0), a.data.stride(1), b_data.stride(0), b_data.stride(1), out.stride(0), out.stride(1),
        sa.stride(0), sa.stride(1), sb_n, sb_k,
        B_ROWS_PER_SCALE=rows_per_scale, ROUND_BF16=kernel_out == torch.bfloat16, **cfg)
    return out if out.dtype == out_dtype else out.to(out_dtype)
