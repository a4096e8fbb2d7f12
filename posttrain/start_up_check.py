"""How the toolkit's fused kernels are adopted: in place of transformers' modules, and on a device only after
a start-up check there, once per device.

The RMSNorm, routed-experts, MLA and SwiGLU kernels compare themselves on first use with a float64 reference; a
failure (a wrong result or an exception) is logged once and the eager ops are used on that device from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

Check = Callable[[torch.device], "str | None"]  # None if the kernel agrees, else what went wrong
T = TypeVar("T")


def swap_module_class(model: nn.Module, cls: type[nn.Module], fused_cls: type[nn.Module]) -> int:
    """Makes every module of ``model`` whose type is exactly ``cls`` a ``fused_cls`` (a subclass that adds no
    state) in place: parameters, hooks and state-dict keys stay, nothing is copied, meta stays meta. Returns how
    many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is cls:
            module.__class__ = fused_cls
            changed += 1
    return changed


def run_start_up_check(compare: Check, device: torch.device) -> str | None:
    """``compare(device)`` with autograd on and autocast off (a check may run inside inference or autocast
    code); an exception counts as a failure and is returned as its message."""
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            return compare(device)
    except Exception as e:  # noqa: BLE001 — any failure means: do not use the kernel here
        return f"{type(e).__name__}: {e}"


def device_key(device: torch.device | str) -> str:
    """The name a device's check results are kept under: ``cuda`` without an index is the current CUDA device,
    so that ``torch.device("cuda")`` and a tensor's ``cuda:0`` share one check (not run twice, not run again
    inside a caller's count of kernel launches)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return str(device)


def decided_once(results: dict[str, T], device: torch.device | str, decide: Callable[[], T], prefix: str = "") -> T:
    """``decide()`` the first time ``device`` is seen (under ``prefix`` + :func:`device_key`), the kept answer after:
    a fast path's availability or a kernel's start-up check costs one dict lookup per call, not a capability query
    or a probe."""
    key = prefix + device_key(device)
    if key not in results:
        results[key] = decide()
    return results[key]


def passed_on(device: torch.device, results: dict[str, str | None], check: Check, kernel: str, fallback: str,
              log: logging.Logger) -> bool:
    """True if ``check`` passed on ``device``; it runs the first time a device is seen, and ``results`` keeps
    the outcome under :func:`device_key` (None, or what went wrong, logged once as "<kernel> failed its start-up
    check on <device>")."""
    def check_and_log() -> str | None:
        key = device_key(device)
        problem = check(torch.device(key))
        if problem is not None:
            log.warning("%s failed its start-up check on %s (%s); %s", kernel, key, problem, fallback)
        return problem

    return decided_once(results, device, check_and_log) is None


# -- the bounds the checks and the kernels' tests compare with ----------------------------------------------
def rounded_once_bound(exact: torch.Tensor, before: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far a value computed in fp32 to within ``before`` of ``exact`` (float64), then rounded once to
    ``dtype``, may be from ``exact``: the rounding adds half a step of ``dtype`` (2^-8 relative for bf16)."""
    half_step = torch.finfo(dtype).eps / 2 if dtype != torch.float32 else 2.0**-24
    return before + half_step * (exact.abs() + before) + 1e-30


def combine_error_bound(terms_abs_sum: torch.Tensor, exact: torch.Tensor, n_terms: int, dtype: torch.dtype) -> torch.Tensor:
    """How far an fp32 sum of ``n_terms`` fp32-rounded products, rounded once to ``dtype``, may be from the exact
    sum: each product and each addition errs by at most 2^-24 of what it adds up, so at most n·2^-24·Σ|terms|
    before the final rounding."""
    return rounded_once_bound(exact, n_terms * 2.0**-24 * terms_abs_sum, dtype)
