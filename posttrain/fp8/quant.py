"""Fine-grained FP8 (e4m3) quantization math, DeepSeek-V3 style.

DeepSeek-V3 technical report, §3.3.2 "Improved Precision from Quantization and
Multiplication": scaling groups are 1x128 tiles for activations (per token, per 128
channels) and 128x128 blocks for weights; scales are computed online from the group's
max-abs value, and every tensor uses E4M3 ("mantissa over exponents").

Conventions used everywhere in ``posttrain.fp8``:

* ``scale_inv`` is the *dequantization* multiplier, as stored in DeepSeek checkpoints
  (``weight_scale_inv``): ``w ≈ fp8.float() * scale_inv`` broadcast over the group.
* Groups are ceil-divided: the last block along a dimension that is not a multiple of
  the block size is partial (``kv_a_proj_with_mqa`` is 576 x 7168 -> a 5 x 56 grid).
  transformers' dequantizer infers the block as ``rows // scale_rows`` and gets this
  wrong; nothing here infers the block from the scale shape.
* ``scale_inv = amax / 448`` per group. A group whose amax is 0 gets ``scale_inv = 1``
  (any positive value gives all-zero fp8; 1 is also a power of two, so it is valid for
  ``ue8m0``). Scales are clamped below at the smallest normal fp32 so tiny-but-nonzero
  groups never divide by zero.
* ``scale_fmt="ue8m0"`` (DeepSeek-V3.1; ``quantization_config.scale_fmt`` in the
  checkpoint config, which vLLM reads to turn on DeepGEMM's UE8M0 path) rounds every
  scale *up* to a power of two, so ``|w / scale_inv| <= 448`` still holds. The scale is
  still stored as float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
DEFAULT_BLOCK = (128, 128)
DEFAULT_TILE = 128
SCALE_FMTS = (None, "ue8m0")

_FP32_TINY = torch.finfo(torch.float32).tiny


def scale_grid_shape(shape: Sequence[int], block: Sequence[int] = DEFAULT_BLOCK) -> tuple[int, ...]:
    """Shape of the scale grid for a tensor of ``shape`` quantized in ``block`` groups over its last two dims.

    Leading dimensions (e.g. the expert dimension of a fused [E, out, in] tensor) are kept.
    """
    if len(shape) < 2:
        raise ValueError(f"block quantization needs a >= 2-D tensor, got shape {tuple(shape)}")
    br, bc = int(block[0]), int(block[1])
    return (*shape[:-2], math.ceil(shape[-2] / br), math.ceil(shape[-1] / bc))


def _check_scale_fmt(scale_fmt: str | None) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def round_scale_to_pow2(scale_inv: torch.Tensor) -> torch.Tensor:
    """Round positive scales *up* to the next power of two (UE8M0), exactly.

    ``frexp`` gives ``s = m * 2**e`` with ``m`` in [0.5, 1); ``s`` is already a power of
    two iff ``m == 0.5``. This avoids the off-by-one that ``ceil(log2(s))`` can hit when
    ``log2`` rounds.
    """
    mantissa, exponent = torch.frexp(scale_inv)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(scale_inv), exponent)


def _pad_to_blocks(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    rows, cols = x.shape[-2], x.shape[-1]
    pr, pc = (-rows) % br, (-cols) % bc
    if pr == 0 and pc == 0:
        return x
    return torch.nn.functional.pad(x, (0, pc, 0, pr))


def compute_scale_inv(
    amax: torch.Tensor, scale_fmt: str | None = None, *, check_finite: bool = True
) -> torch.Tensor:
    """Dequantization scales from per-group max-abs values (float32)."""
    _check_scale_fmt(scale_fmt)
    amax = amax.float()
    if check_finite and not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantize a tensor with inf/nan values to fp8")
    scale_inv = (amax / FP8_MAX).clamp_min(_FP32_TINY)
    scale_inv = torch.where(amax > 0, scale_inv, torch.ones_like(scale_inv))
    if scale_fmt == "ue8m0":
        scale_inv = round_scale_to_pow2(scale_inv)
    return scale_inv


def quantize_groups(
    x: torch.Tensor,
    group: Sequence[int],
    scale_fmt: str | None = None,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last two dims of ``x`` in ``group = (rows, cols)`` groups (ceil-divided).

    Returns ``(fp8, scale_inv)`` with ``fp8.shape == x.shape`` and
    ``scale_inv.shape == scale_grid_shape(x.shape, group)`` (float32).
    Math runs in float32 whatever the input dtype.
    """
    br, bc = int(group[0]), int(group[1])
    rows, cols = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    xf = _pad_to_blocks(x.float(), br, bc)
    gr, gc = xf.shape[-2] // br, xf.shape[-1] // bc
    xv = xf.reshape(*lead, gr, br, gc, bc)
    amax = xv.abs().amax(dim=(-3, -1))
    scale_inv = compute_scale_inv(amax, scale_fmt, check_finite=check_finite)
    # Division (not multiplication by a reciprocal) keeps the amax element at exactly
    # ±448 before rounding; the clamp guards against cast behaviours that do not saturate.
    q = (xv / scale_inv[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*lead, gr * br, gc * bc)
    if q.shape[-2] != rows or q.shape[-1] != cols:
        q = q[..., :rows, :cols].contiguous()
    return q, scale_inv


def expand_scale(scale_inv: torch.Tensor, shape: Sequence[int], group: Sequence[int]) -> torch.Tensor:
    """Broadcast a group scale grid to a full ``shape`` tensor (float32), cropping partial groups."""
    br, bc = int(group[0]), int(group[1])
    expected = scale_grid_shape(shape, group)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale grid {tuple(scale_inv.shape)} does not match tensor {tuple(shape)} with group {br}x{bc} "
            f"(expected {expected})"
        )
    s = scale_inv.float()
    if br > 1:
        s = s.repeat_interleave(br, dim=-2)
    if bc > 1:
        s = s.repeat_interleave(bc, dim=-1)
    return s[..., : shape[-2], : shape[-1]]


def dequantize_groups(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    group: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: ``q.float() * scale_inv`` per group, cast to ``out_dtype``."""
    br, bc = int(group[0]), int(group[1])
    rows, cols = q.shape[-2], q.shape[-1]
    expected = scale_grid_shape(q.shape, group)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale grid {tuple(scale_inv.shape)} does not match tensor {tuple(q.shape)} with group {br}x{bc} "
            f"(expected {expected})"
        )
    s = scale_to_float32(scale_inv)
    if rows % br == 0 and cols % bc == 0:
        lead = q.shape[:-2]
        x = q.to(torch.float32, copy=True).reshape(*lead, rows // br, br, cols // bc, bc)
        x.mul_(s[..., :, None, :, None])
        x = x.reshape(q.shape)
    else:
        x = q.to(torch.float32, copy=True).mul_(expand_scale(s, q.shape, group))
    return x if out_dtype == torch.float32 else x.to(out_dtype)


def scale_to_float32(scale_inv: torch.Tensor) -> torch.Tensor:
    """Scales as float32, accepting float32/bf16, ``float8_e8m0fnu`` and raw UE8M0 bytes (``uint8``)."""
    if scale_inv.dtype == torch.uint8:  # MX-style biased exponent bytes
        return torch.ldexp(torch.ones_like(scale_inv, dtype=torch.float32), scale_inv.to(torch.int32) - 127)
    return scale_inv.float()


# --- the two granularities of the report (§3.3.2) -------------------------------------------


def quantize_blockwise(
    w: torch.Tensor,
    block: Sequence[int] = DEFAULT_BLOCK,
    scale_fmt: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[..., out, in]`` in 128x128 blocks -> ``(fp8, weight_scale_inv)``.

    ``weight_scale_inv`` is float32 of shape ``[..., ceil(out/128), ceil(in/128)]``.
    Raises ``ValueError`` on inf/nan (a diverged weight must not be exported silently).
    """
    return quantize_groups(w, block, scale_fmt)


def dequantize_blockwise(
    fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: Sequence[int] = DEFAULT_BLOCK,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize a block-quantized weight: ``fp8.float() * scale_inv`` per block, as ``out_dtype``."""
    return dequantize_groups(fp8, scale_inv, block, out_dtype)


def quantize_tilewise_act(
    x: torch.Tensor,
    tile: int = DEFAULT_TILE,
    scale_fmt: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``[..., K]`` in 1 x ``tile`` tiles along the last dim (per token, per 128 channels).

    Returns ``(fp8 [..., K], scale_inv [..., ceil(K/tile)])``. No finiteness check (it
    would force a device sync on every call in training).
    """
    shape = x.shape
    q, s = quantize_groups(x.reshape(-1, shape[-1]), (1, tile), scale_fmt, check_finite=False)
    return q.reshape(shape), s.reshape(*shape[:-1], s.shape[-1])


def dequantize_tilewise_act(
    q: torch.Tensor, scale_inv: torch.Tensor, tile: int = DEFAULT_TILE, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_tilewise_act`."""
    shape = q.shape
    x = dequantize_groups(q.reshape(-1, shape[-1]), scale_inv.reshape(-1, scale_inv.shape[-1]), (1, tile), out_dtype)
    return x.reshape(shape)


def e4m3_error_bound(x: torch.Tensor, scale_inv_full: torch.Tensor) -> torch.Tensor:
    """Worst-case |dequant(quant(x)) - x| for round-to-nearest e4m3 with the given per-element scale.

    Normals (|x/s| >= 2**-6): half an ulp, at most 2**-4 of the value (3 mantissa bits).
    Subnormals: half the subnormal spacing 2**-9, i.e. 2**-10 times the scale.
    """
    return torch.maximum(x.abs().float() * 2.0**-4, scale_inv_full.float() * 2.0**-10)
