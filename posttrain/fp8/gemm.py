"""FP8 GEMMs on block-quantized operands: a reference path that runs anywhere, and
``torch.nn.functional.scaled_mm`` with DeepSeek block scales on Hopper.

All products are "NT": ``A [M, K] @ B [N, K]^T`` with both operands quantized in groups
along the contraction dim K (1x128 tiles or 128x128 blocks), which is what the report's
scheme needs for all three GEMMs of a Linear (§3.3.2, Figure 7 (a)).

* Reference (CPU, any GPU, and any shape): dequantize both operands to fp32 and multiply
  in fp32 -- the report's "fp32 accumulation" (§3.3.2, "Increasing Accumulation
  Precision") with exact per-group scaling, i.e. an emulation of the FP8 kernel.
* Fast path (CUDA, compute capability 9.0 only): torch 2.13's
  ``F.scaled_mm(..., scale_recipe_a=BlockWise1x128, scale_recipe_b=BlockWise128x128 |
  BlockWise1x128)`` (cuBLAS >= 12.9 DeepSeek-style block scaling). Scale layouts follow
  the CUDA checks (see :func:`scaled_mm_operands`): 1x128 scales outer-dim-major
  (``s.t().contiguous().t()``), 128x128 scales padded to a multiple of 4 along K and
  handed over transposed, every operand copied into that layout whatever view it came as.
  Operands are zero-padded to multiples of 128 (zeros add nothing). The path is probed
  once per process against the reference on the forward, dgrad and wgrad orientations and
  disabled with a warning if any raises or disagrees.
* Triton (:mod:`posttrain.fp8.triton_gemm`, opt-in): a block-scaled kernel tiled for the thin shapes,
  probed the same way. Not the default until a GPU has timed it against cuBLAS (``bench_gpu.py``).

``POSTTRAIN_FP8_GEMM=auto|scaled_mm|triton|reference`` picks (``auto``: scaled_mm where it passes its probe, else
the reference; ``triton`` falls back the same way if its probe fails).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..start_up_check import decided_once
from .quant import FP8_DTYPE, dequantize_groups, quantize_groups

log = logging.getLogger(__name__)

TILE = 128


@dataclass
class BlockQuantized:
    """An fp8 matrix with its group scales (``data.float() * scale_inv`` per ``group``)."""

    data: torch.Tensor  # float8_e4m3fn [R, C]
    scale_inv: torch.Tensor  # float32 [ceil(R/gr), ceil(C/gc)]
    group: tuple[int, int]

    @classmethod
    def quantize(cls, x: torch.Tensor, group: Sequence[int], scale_fmt: str | None = None) -> "BlockQuantized":
        q, s = quantize_groups(x, group, scale_fmt, check_finite=False)
        return cls(q, s, (int(group[0]), int(group[1])))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_groups(self.data, self.scale_inv, self.group, dtype)

    def t(self) -> "BlockQuantized":
        """Transposed view (the same groups, transposed): how the dgrad GEMM reuses the forward's weight blocks."""
        return BlockQuantized(self.data.transpose(-2, -1), self.scale_inv.transpose(-2, -1), self.group[::-1])

    def __getitem__(self, i: int) -> "BlockQuantized":
        """Select one matrix of a stacked [E, R, C] operand (experts)."""
        return BlockQuantized(self.data[i], self.scale_inv[i], self.group)


def reference_gemm_nt(a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequant(a) @ dequant(b).T`` in fp32 (autocast off: it would turn this matmul into a bf16 one)."""
    with torch.autocast(a.data.device.type, enabled=False):
        out = a.dequantize(torch.float32) @ b.dequantize(torch.float32).transpose(-2, -1)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


# --- scaled_mm fast path -----------------------------------------------------------------------
#
# Contact point: ``torch.nn.functional.scaled_mm`` / ``ScalingType`` (public since torch 2.10; checked
# against the CUDA checks of torch 2.11-2.13, aten/src/ATen/native/cuda/ScaledBlas.cpp, and measured on
# an H100 with torch 2.11.0+cu130). Its DeepSeek-recipe kernels accept exactly:
#   mat_a [M, K] fp8 e4m3 row-major; mat_b [K, N] fp8 e4m3 column-major (SM90: "Only multiplication of
#   row-major and column-major matrices is supported by cuBLASLt"); K % 16 == 0, N % 16 == 0;
#   BlockWise1x128 scales [rows, ceil(K/128)] float32 with strides (1, rows) ("outer-dim-major");
#   BlockWise128x128 scales of B: [round_up(ceil(K/128), 4), ceil(N/128)] with strides (1, L4).
# Strides are checked, not fixed up, and the kernel reads the scales through their data pointer, so every
# operand is rebuilt here in exactly that layout whatever view it arrives as (a transposed weight for the
# dgrad GEMM, an expert of a stack, a transposed activation for the wgrad GEMM).

_fast_state: dict[str, bool] = {}
GEMM_BACKEND_ENV = "POSTTRAIN_FP8_GEMM"
GEMM_BACKENDS = ("auto", "scaled_mm", "triton", "reference")


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _pad2d(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """Zero-pad (or ``value``-pad) to ``[rows, cols]``; returns ``t`` itself (any view) when no padding is needed."""
    if t.shape[0] == rows and t.shape[1] == cols:
        return t
    if t.dtype == FP8_DTYPE:  # pad through the byte view; fp8 zero is byte 0
        return F.pad(t.view(torch.uint8), (0, cols - t.shape[1], 0, rows - t.shape[0])).view(FP8_DTYPE)
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]), value=value)


def _outer_dim_major(s: torch.Tensor) -> torch.Tensor:
    """``[rows, kb]`` with strides ``(1, rows)`` (a column-major copy), torch's BlockWise1x128 layout; ``s`` itself
    when it has them (the Triton quantizers write activation scales so)."""
    if s.stride(0) == 1 and s.stride(1) == s.shape[0]:
        return s
    return s.t().contiguous().t()


@dataclass
class ScaledMMOperandB:
    """The B operand of ``a @ b.T`` already in ``F.scaled_mm``'s layout (see :func:`prepare_b`). A weight's is
    built once per optimizer step, so that its GEMMs do not pad or copy it again at every call."""

    mat_b: torch.Tensor  # [K_pad, N_pad] fp8, column-major
    scale_b: torch.Tensor  # float32, in the layout scale_recipe_b takes
    scale_recipe_b: object  # torch.nn.functional.ScalingType
    source: BlockQuantized  # what it was made from: the reference path's operand
    n: int  # rows of B before padding (the GEMM's output columns)


def prepare_b(b: BlockQuantized) -> ScaledMMOperandB:
    """``b`` [N, K] (1x128 tiles or 128x128 blocks, any view) as ``F.scaled_mm``'s mat_b: N and K zero-padded to
    multiples of 128 (padded scales are 1), [K, N] column-major, its scales in torch's layout."""
    from torch.nn.functional import ScalingType  # torch >= 2.10

    if b.group not in ((1, TILE), (TILE, TILE)):
        raise ValueError(f"unsupported groups of B: {b.group}")
    n, k = b.data.shape
    np_, kp = _round_up(n, TILE), _round_up(k, TILE)
    kb = kp // TILE
    # B as [N, K] row-major, i.e. mat_b = b_data.t() is [K, N] column-major
    b_data = _pad2d(b.data, np_, kp).contiguous()
    if b.group == (TILE, TILE):
        l4 = _round_up(kb, 4)
        # [N/128, L4] row-major, handed over transposed: [L4, N/128] with strides (1, L4)
        b_scale = _pad2d(b.scale_inv.float(), np_ // TILE, l4, 1.0).contiguous().t()
        recipe_b = ScalingType.BlockWise128x128
    else:
        b_scale = _outer_dim_major(_pad2d(b.scale_inv.float(), np_, kb, 1.0))
        recipe_b = ScalingType.BlockWise1x128
    return ScaledMMOperandB(b_data.t(), b_scale, recipe_b, b, n)


def scaled_mm_operands(a: BlockQuantized, b: BlockQuantized | ScaledMMOperandB) -> dict:
    """The arguments of ``F.scaled_mm`` for ``a @ b.T`` in torch's required layout (see the note above).

    M is padded to a multiple of 16, N and K to multiples of 128 with zeros (zeros add nothing; padded
    scales are 1). ``b`` may come prepared (:func:`prepare_b`). Kept as a separate function so that tests can
    check the layouts without a GPU.
    """
    from torch.nn.functional import ScalingType  # torch >= 2.10

    if a.group != (1, TILE):
        raise ValueError(f"unsupported groups of A: {a.group}")
    pb = b if isinstance(b, ScaledMMOperandB) else prepare_b(b)
    m, k = a.data.shape
    mp, kp = _round_up(m, 16), _round_up(k, TILE)
    if pb.mat_b.shape[0] != kp:
        raise ValueError(f"a has {k} columns, b {pb.source.data.shape[1]}")
    a_data = _pad2d(a.data, mp, kp).contiguous()
    a_scale = _outer_dim_major(_pad2d(a.scale_inv.float(), mp, kp // TILE, 1.0))
    return dict(mat_a=a_data, mat_b=pb.mat_b, scale_a=a_scale, scale_recipe_a=ScalingType.BlockWise1x128,
                scale_b=pb.scale_b, scale_recipe_b=pb.scale_recipe_b)


def scaled_mm_gemm_nt(
    a: BlockQuantized, b: BlockQuantized | ScaledMMOperandB, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The same product through ``F.scaled_mm`` with DeepSeek block scales (Hopper), for any operand views."""
    m, n = a.data.shape[0], (b.n if isinstance(b, ScaledMMOperandB) else b.data.shape[0])
    kernel_out = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    ops = scaled_mm_operands(a, b)
    # operands positionally, scales by the keywords the H100 run used (torch 2.11.0+cu130)
    out = F.scaled_mm(ops.pop("mat_a"), ops.pop("mat_b"), **ops, output_dtype=kernel_out)
    if out.shape[0] != m or out.shape[1] != n:
        out = out[:m, :n]
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _gemm_mode() -> str:
    mode = os.environ.get(GEMM_BACKEND_ENV, "auto")
    if mode not in GEMM_BACKENDS:
        raise ValueError(f"{GEMM_BACKEND_ENV} must be one of {', '.join(GEMM_BACKENDS)}, got {mode!r}")
    return mode


def _fast_path_available(device: torch.device) -> bool:
    """Whether ``F.scaled_mm``'s block-scaled kernel runs on ``device`` and passed its probe there: decided once per
    device (at every GEMM only a dict lookup: the layers are launch-bound where the GEMMs are short)."""
    if device.type != "cuda":
        return False

    def decide() -> bool:
        hopper = (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")
                  and torch.cuda.get_device_capability(device) == (9, 0))
        return hopper and (_gemm_mode() == "scaled_mm" or _probe(device))

    return decided_once(_fast_state, device, decide)


# The probe covers the three GEMMs of a Linear (§3.3.2, Figure 7 (a)) as linear.py issues them, on shapes
# that need padding (200 x 300 x 320) and on one whose dgrad needs none (in 384, out 512: W^T's 3 x 4
# scale grid is a transposed view that fits torch's [L4, N/128] shape as it is, so only an explicit copy
# gives it torch's strides -- the case that failed on 8 of the 9 V3 shapes on H100).
PROBE_ORIENTATIONS = ("forward", "dgrad", "wgrad")
PROBE_SHAPES = ((200, 300, 320), (256, 384, 512))  # (tokens M, in K, out N)


def _probe_cases(device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    for m, k, n in PROBE_SHAPES:
        x = torch.randn(m, k, device=device, generator=g)
        w = torch.randn(n, k, device=device, generator=g)
        gy = torch.randn(m, n, device=device, generator=g)
        wq = BlockQuantized.quantize(w, (TILE, TILE))
        yield "forward", BlockQuantized.quantize(x, (1, TILE)), wq
        yield "dgrad", BlockQuantized.quantize(gy, (1, TILE)), wq.t()
        yield "wgrad", BlockQuantized.quantize(gy.t(), (1, TILE)), BlockQuantized.quantize(x.t(), (1, TILE))


def _probe(device: torch.device, name: str = "scaled_mm", gemm=None) -> bool:
    """Check a fast kernel (``gemm``, default ``scaled_mm_gemm_nt``) once, on all three orientations (operands as
    given and as prepared for the step), against the reference; False disables it."""
    gemm = gemm or scaled_mm_gemm_nt
    try:
        for orientation, a, b in _probe_cases(device):
            ref = reference_gemm_nt(a, b)
            for operand in (b, prepare_b(b)):
                err = (gemm(a, operand).float() - ref).norm() / ref.norm()
                if not bool(err < 1e-3):
                    log.warning("the %s block-FP8 GEMM disagrees with the reference in the %s GEMM %s (rel err %.3g); "
                                "not using it", name, orientation, tuple(a.data.shape) + tuple(b.data.shape), float(err))
                    return False
        return True
    except Exception as e:  # noqa: BLE001 -- any failure means: do not use it
        log.warning("the %s block-FP8 GEMM is unavailable (%s: %s); not using it", name, type(e).__name__, e)
        return False


def triton_gemm_usable(device: torch.device | str) -> bool:
    """Whether the Triton kernel runs on ``device`` and passed its start-up probe there (probed once)."""
    from . import triton_gemm

    device = torch.device(device)
    return decided_once(_fast_state, device, lambda: triton_gemm.available(device)
                        and _probe(device, "Triton", triton_gemm.gemm_nt), prefix="triton ")


def active_backend(device: torch.device | str) -> str:
    """``"triton"``, ``"scaled_mm"`` or ``"reference"``: what :func:`fp8_gemm_nt` uses on ``device`` (each fast
    kernel probed once per device; see the module docstring for ``POSTTRAIN_FP8_GEMM``)."""
    device = torch.device(device)
    mode = _gemm_mode()
    if mode == "reference":
        return "reference"
    if mode == "triton" and triton_gemm_usable(device):
        return "triton"
    return "scaled_mm" if _fast_path_available(device) else "reference"


def fast_path_active(device: torch.device | str) -> bool:
    """Whether :func:`fp8_gemm_nt` takes a fast kernel on ``device``; a weight's operands are then laid out
    once per step (:func:`prepare_b`), which both fast kernels read."""
    return active_backend(device) != "reference"


def fp8_gemm_nt(
    a: BlockQuantized, b: BlockQuantized | ScaledMMOperandB, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``A @ B^T`` for block-quantized operands: the kernel :func:`active_backend` names, the fp32 reference
    for groups the fast kernels do not take."""
    backend = active_backend(a.data.device) if a.group == (1, TILE) else "reference"
    if backend == "triton":
        from .triton_gemm import gemm_nt

        return gemm_nt(a, b, out_dtype)
    if backend == "scaled_mm":
        return scaled_mm_gemm_nt(a, b, out_dtype)
    return reference_gemm_nt(a, b.source if isinstance(b, ScaledMMOperandB) else b, out_dtype)
