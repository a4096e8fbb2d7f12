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
  torch's own ``test_scaled_mm_block_wise_numerics``: 1x128 scales outer-dim-major
  (``s.t().contiguous().t()``), 128x128 scales padded to a multiple of 4 along K and
  transposed. Operands are zero-padded to multiples of 128 (zeros add nothing). The path
  is probed once per process against the reference and disabled with a warning if it
  raises or disagrees. ``POSTTRAIN_FP8_GEMM=reference|scaled_mm|auto`` overrides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

_fast_state: dict[str, bool] = {}


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _pad2d(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    if t.shape[0] == rows and t.shape[1] == cols:
        return t
    if t.dtype == FP8_DTYPE:  # pad through the byte view; fp8 zero is byte 0
        return F.pad(t.view(torch.uint8), (0, cols - t.shape[1], 0, rows - t.shape[0])).view(FP8_DTYPE)
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]), value=value)


def scaled_mm_gemm_nt(a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same product through ``F.scaled_mm`` with block scales (Hopper)."""
    from torch.nn.functional import ScalingType

    if a.group != (1, TILE) or b.group not in ((1, TILE), (TILE, TILE)):
        raise ValueError(f"unsupported groups {a.group} x {b.group}")
    m, k = a.data.shape
    n = b.data.shape[0]
    mp, np_, kp = _round_up(m, 16), _round_up(n, TILE), _round_up(k, TILE)
    kb = kp // TILE
    a_data = _pad2d(a.data.contiguous(), mp, kp)
    a_scale = _pad2d(a.scale_inv.float(), mp, kb, 1.0).t().contiguous().t()
    b_data = _pad2d(b.data.contiguous(), np_, kp)  # [N, K] row-major == [K, N] column-major
    if b.group == (TILE, TILE):
        l4 = _round_up(kb, 4)
        b_scale = _pad2d(b.scale_inv.float(), np_ // TILE, l4, 1.0).t()
        recipe_b = ScalingType.BlockWise128x128
    else:
        b_scale = _pad2d(b.scale_inv.float(), np_, kb, 1.0).t().contiguous().t()
        recipe_b = ScalingType.BlockWise1x128
    out = F.scaled_mm(
        a_data,
        b_data.t(),
        scale_a=a_scale,
        scale_recipe_a=ScalingType.BlockWise1x128,
        scale_b=b_scale,
        scale_recipe_b=recipe_b,
        output_dtype=out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32,
    )
    return out[:m, :n].to(out_dtype)


def _fast_path_available(device: torch.device) -> bool:
    mode = os.environ.get("POSTTRAIN_FP8_GEMM", "auto")
    if mode == "reference" or device.type != "cuda":
        return False
    if not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    key = str(device)
    if key not in _fast_state:
        _fast_state[key] = True if mode == "scaled_mm" else _probe(device)
    return _fast_state[key]


def _probe(device: torch.device) -> bool:
    """Check the fast path once on awkward shapes against the reference."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(200, 300, device=device, generator=g)
        w = torch.randn(320, 300, device=device, generator=g)
        a = BlockQuantized.quantize(x, (1, TILE))
        for b in (BlockQuantized.quantize(w, (TILE, TILE)), BlockQuantized.quantize(w, (1, TILE))):
            ref = reference_gemm_nt(a, b)
            got = scaled_mm_gemm_nt(a, b)
            err = (got - ref).norm() / ref.norm()
            if not bool(err < 1e-3):
                log.warning("scaled_mm block-FP8 path disagrees with the reference (rel err %.3g); using emulation", err)
                return False
        return True
    except Exception as e:  # noqa: BLE001 -- any failure means: do not use it
        log.warning("scaled_mm block-FP8 path unavailable (%s); using emulation", e)
        return False


def fp8_gemm_nt(a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``A @ B^T`` for block-quantized operands; picks ``scaled_mm`` on Hopper, the fp32 reference elsewhere."""
    if _fast_path_available(a.data.device) and a.group == (1, TILE):
        return scaled_mm_gemm_nt(a, b, out_dtype)
    return reference_gemm_nt(a, b, out_dtype)


def active_backend(device: torch.device | str) -> str:
    """``"scaled_mm"`` or ``"reference"`` -- what :func:`fp8_gemm_nt` uses on ``device``."""
    return "scaled_mm" if _fast_path_available(torch.device(device)) else "reference"
