"""CPU stand-ins for torch's Hopper FP8 GEMMs that enforce their input contract, decoded from torch's source.

No GPU is needed to check that ``posttrain.fp8`` hands ``F.scaled_mm`` / ``F.scaled_grouped_mm`` operands in
exactly the shapes, strides and dtypes the CUDA kernels accept: a layout the real op would reject raises
:class:`ContractViolation` here with torch's own message, and an accepted call is computed (in float64) by
reading the scales the way the kernel reads them, so a layout that passes the checks with the wrong
*contents* (e.g. a transposed scale grid with the right strides) gives wrong numbers.

Sources (torch 2.11-2.13; the same checks in both, read from pytorch/pytorch main):

* ``aten/src/ATen/native/cuda/ScaledBlas.cpp``: ``_scaled_mm_cuda_v2_out`` (K % 16, mat_b dims % 16,
  fp8 e4m3 operands, float32 scales for the DeepSeek recipes via ``check_deepseek_recipe``), and
  ``_scaled_block1x128_block128x128`` / ``_scaled_block1x128_block1x128`` /
  ``_scaled_block128x128_block1x128`` for the scale shapes and strides quoted in :func:`_check_scale`.
* ``aten/src/ATen/native/cuda/cuBlasCommonArgs.h`` + ``_scaled_gemm``: on SM90 only row-major A x
  column-major B ("Only multiplication of row-major and column-major matrices is supported by cuBLASLt").
* ``aten/src/ATen/native/cuda/GroupedBlas.cpp`` ``_scaled_grouped_mm_cuda_v2`` and
  ``GroupedMMUtils.h`` ``check_valid_strides_and_return_transposed`` for the row-wise grouped GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.functional import ScalingType

FP8 = torch.float8_e4m3fn


class ContractViolation(ValueError):
    """What torch raises (``TORCH_CHECK_VALUE`` -> ValueError, ``TORCH_CHECK`` -> RuntimeError) for a bad call."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def _require(cond: bool, *msg: object) -> None:
    if not cond:
        raise ContractViolation("".join(str(m) for m in msg))


def _dense_2d(t: torch.Tensor) -> bool:
    """``is_non_overlapping_and_dense`` for a 2-D tensor: row- or column-major without gaps."""
    (r, c), (s0, s1) = t.shape, t.stride()
    row_major = (c == 1 or s1 == 1) and (r == 1 or s0 == c)
    col_major = (r == 1 or s0 == 1) and (c == 1 or s1 == r)
    return row_major or col_major


def _cublas_transposes(t: torch.Tensor) -> bool:
    """``prepare_matrix_for_cublas(tensor, transpose_tensor, transpose_result)`` -> transpose_tensor."""
    if _dense_2d(t):
        return t.is_contiguous()
    (r, c), (s0, s1) = t.shape, t.stride()
    if s0 == 1 and s1 >= max(1, r):
        return False
    return True  # row-major-like, or cloned to contiguous


def _check_scale(name: str, scale: torch.Tensor, rows: int, cols: int, stride1: int) -> None:
    """``scale.size() == (rows, cols)``, ``scale.stride(0) == 1`` and ``scale.stride(1) == stride1``
    (or ``size(1) == 1`` with ``stride(1) == 1``) -- the form every DeepSeek-recipe check in
    ScaledBlas.cpp takes, e.g. for BlockWise128x128 B: "scale_b must have strides (1, L4)"."""
    _require(scale.dtype == torch.float32, f"{name} must be float32, got {scale.dtype}")
    _require(scale.dim() == 2 and tuple(scale.shape) == (rows, cols),
             f"{name} must have shape {rows} x {cols} Float elements, got {list(scale.shape)}")
    ok = scale.stride(0) == 1 and (scale.stride(1) == stride1 or (scale.size(1) == 1 and scale.stride(1) == 1))
    _require(ok, f"{name} must have strides (1, {stride1}); got {list(scale.stride())}")


def _as_list(v):
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


@dataclass
class FakeScaledMM:
    """Drop-in for ``torch.nn.functional.scaled_mm`` (the signature of torch 2.11+) on CPU tensors.

    Records each accepted call as ``(scale_recipe_a, scale_recipe_b, M, N, K)`` in ``calls``. Works on
    ``meta`` tensors too: then only the contract is checked and an empty result is returned.
    """

    calls: list[tuple] = field(default_factory=list)

    def __call__(self, mat_a, mat_b, scale_a, scale_recipe_a, scale_b, scale_recipe_b, swizzle_a=None, swizzle_b=None,
                 bias=None, output_dtype=torch.bfloat16, contraction_dim=(), use_fast_accum=False):
        sa, sb = _as_list(scale_a), _as_list(scale_b)
        ra, rb = _as_list(scale_recipe_a), _as_list(scale_recipe_b)
        _require(mat_a.dim() == 2 and mat_b.dim() == 2, "mat_a and mat_b must be matrices")
        m, k = mat_a.shape
        k2, n = mat_b.shape
        _require(k == k2, f"mat_a and mat_b shapes cannot be multiplied ({m}x{k} and {k2}x{n})")
        _require(k % 16 == 0, f"Expected trailing dimension of mat1 to be divisible by 16 but got mat1 shape: ({m}x{k}).")
        _require(k2 % 16 == 0 and n % 16 == 0, f"mat2 shape ({k2}x{n}) must be divisible by 16")
        # check_deepseek_recipe: e4m3fn operands, one float32 scale and one recipe per operand
        _require(mat_a.dtype == FP8 and mat_b.dtype == FP8, f"Invalid scaling configuration (operands {mat_a.dtype}, {mat_b.dtype})")
        _require(len(sa) == 1 and len(sb) == 1 and len(ra) == 1 and len(rb) == 1, "Invalid scaling configuration (one scale each)")
        ra, rb, sa, sb = ra[0], rb[0], sa[0], sb[0]
        pair = (ra, rb)
        allowed = {(ScalingType.BlockWise1x128, ScalingType.BlockWise128x128),
                   (ScalingType.BlockWise128x128, ScalingType.BlockWise1x128),
                   (ScalingType.BlockWise1x128, ScalingType.BlockWise1x128)}
        _require(pair in allowed, f"Invalid scaling configuration {pair}")
        _require(bias is None, "bias is not used by posttrain")
        _require(output_dtype in (torch.bfloat16, torch.float32, torch.float16), f"bad output dtype {output_dtype}")
        kb, l4 = _ceil_div(k, 128), _round_up(_ceil_div(k, 128), 4)
        if ra == ScalingType.BlockWise1x128:  # "scale_a strides must be (1, M)"
            _check_scale("scale_a", sa, m, kb, m)
        else:  # "As: [round_up(K // 128, 4), M // 128], stride: [1, L4]"
            _check_scale("scale_a", sa, l4, _ceil_div(m, 128), l4)
        if rb == ScalingType.BlockWise128x128:  # "Bs: [round_up(K // 128, 4) x N // 128], stride: [1, L4]"
            _check_scale("scale_b", sb, l4, _ceil_div(n, 128), l4)
        else:  # "Bs: [N x K // 128], stride: [1, N]"
            _check_scale("scale_b", sb, n, kb, n)
        # SM90: transpose_result is true for the contiguous output, so cuBLAS sees (B^T A^T); it needs
        # transa == 't' (mat_b column-major) and transb == 'n' (mat_a row-major).
        transa = not _cublas_transposes(mat_b)
        transb = not _cublas_transposes(mat_a)
        _require(transa and not transb, "Only multiplication of row-major and column-major matrices is supported by cuBLASLt")
        self.calls.append((ra, rb, m, n, k))
        if mat_a.device.type == "meta":
            return torch.empty(m, n, dtype=output_dtype, device="meta")
        a = mat_a.double() * _expand(sa, ra, m, k, lhs=True)
        b = mat_b.double() * _expand(sb, rb, n, k, lhs=False).t()
        return (a @ b).to(output_dtype)


def _expand(scale: torch.Tensor, recipe: ScalingType, outer: int, k: int, lhs: bool) -> torch.Tensor:
    """The full [outer, K] multiplier the kernel applies, read from the (checked) scale layout."""
    s = scale.double()
    if recipe == ScalingType.BlockWise1x128:  # [outer, K/128]
        full = s.repeat_interleave(128, 1)
    else:  # [L4, outer/128] with the K blocks along dim 0 (rows past ceil(K/128) are padding)
        full = s[: _ceil_div(k, 128)].t().repeat_interleave(128, 0).repeat_interleave(128, 1)
    return full[:outer, :k]


def _grouped_transposed(mat: torch.Tensor, name: str) -> bool:
    """``check_valid_strides_and_return_transposed`` (GroupedMMUtils.h), alignment 16 bytes."""
    st, sz = mat.stride(), mat.shape
    align = 16 // mat.element_size()
    if st[-2] == 1 and st[-1] >= max(1, sz[-2]):
        _require(st[-1] % align == 0, "strides should be multiple of 16 bytes")
        return True
    if st[-1] == 1 and st[-2] >= max(1, sz[-1]):
        _require(st[-2] % align == 0, "strides should be multiple of 16 bytes")
        return False
    raise ContractViolation(f"Invalid strides/sizes, got {list(st)} for strides and {list(sz)} for sizes ({name})")


@dataclass
class FakeScaledGroupedMM:
    """Drop-in for ``F.scaled_grouped_mm`` (torch 2.11+), row-wise recipe, the 2d x 3d (MoE forward) case."""

    calls: list[tuple] = field(default_factory=list)

    def __call__(self, mat_a, mat_b, scale_a, scale_recipe_a, scale_b, scale_recipe_b, swizzle_a=None, swizzle_b=None,
                 bias=None, offs=None, output_dtype=torch.bfloat16, contraction_dim=(), use_fast_accum=False):
        _require(not _grouped_transposed(mat_a, "mat_a"), "Expected mat1 to not be transposed")
        _require(_grouped_transposed(mat_b, "mat_b"), "Expected mat2 to be transposed")
        _require(mat_a.dim() == 2 and mat_b.dim() == 3, "posttrain uses the 2d x 3d case only")
        _require(mat_a.size(-1) == mat_b.size(-2), "contraction dimension of mat_a and mat_b must match")
        _require(mat_a.size(-1) % 16 == 0, f"Expected trailing dimension of mat_a to be divisible by 16 but got mat1 shape: ({list(mat_a.shape)}).")
        _require(mat_b.size(-2) % 16 == 0 and mat_b.size(-1) % 16 == 0, f"Expected mat_b shape to be divisible by 16 but got mat_b shape: ({list(mat_b.shape)}).")
        _require(bias is None, "Bias not supported yet")
        _require(offs is not None, "Have to provide offsets if there is a 2d matrix")
        _require(offs.dim() == 1 and offs.dtype == torch.int32, "Offsets have to be int32 (1D)")
        _require(offs.size(0) == mat_b.size(0), "matrix batch sizes have to match")
        _require((output_dtype or torch.bfloat16) == torch.bfloat16, "Only bf16 high precision output types are supported for grouped gemm")
        sa, sb, ra, rb = _as_list(scale_a), _as_list(scale_b), _as_list(scale_recipe_a), _as_list(scale_recipe_b)
        # check_rowwise_recipe: fp8 operands, one float32 scale and RowWise recipe each
        _require(mat_a.dtype == FP8 and mat_b.dtype == FP8, "Expected mat_a/mat_b to be Float8_e4m3 matrices")
        _require(len(sa) == len(sb) == len(ra) == len(rb) == 1 and ra[0] == rb[0] == ScalingType.RowWise,
                 "No gemm implementation was found")
        sa, sb = sa[0], sb[0]
        _require(sa.dtype == torch.float32 and sb.dtype == torch.float32, "For grouped FP8 rowwise, both scales must be float32 tensors")
        # _check_scales_fp8_rowwise
        _require(sa.dim() == 1 and sa.is_contiguous() and sa.size(0) == mat_a.size(0), "scale must be a contiguous 1D tensor with the length of mat for arg 0")
        _require(sb.dim() == 2 and sb.stride(1) == 1 and sb.size(0) == mat_b.size(0) and sb.size(1) == mat_b.size(2),
                 "scale must be a 2D tensor [G, N] contiguous in the last dimension for arg 1")
        ends = offs.tolist()
        _require(all(b >= a for a, b in zip([0] + ends, ends)) and ends[-1] <= mat_a.size(0), f"offsets must be non-decreasing and <= M: {ends}")
        self.calls.append(("rowwise", tuple(ends)))
        # rows past offs[-1] are never written by the kernel (create_grouped_gemm_output_tensor is empty_strided)
        out = torch.full((mat_a.size(0), mat_b.size(-1)), float("nan"), dtype=torch.float64)
        a = mat_a.double() * sa.double()[:, None]
        start = 0
        for g, end in enumerate(ends):
            if end > start:
                out[start:end] = a[start:end] @ (mat_b[g].double() * sb[g].double()[None, :])
            start = end
        return out.to(torch.bfloat16)
