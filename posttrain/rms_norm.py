"""DeepSeek-V3's RMSNorm through torch's fused kernel on CUDA, transformers' formula everywhere else.

transformers' `DeepseekV3RMSNorm` computes in eager ops: an fp32 copy of the input, its square, the mean,
rsqrt, two products and two casts: 8 kernels forward and 16 backward, moving 132 bytes per normalized
element in bf16, where a fused kernel moves about 10 (read x, write y; read dy and x, write dx), and it keeps
fp32 copies of its input for the backward (benchmarks/RESULTS.md, session 15). torch has the fused kernel:
`F.rms_norm` dispatches to `_fused_rms_norm` on CUDA (forward and backward one kernel each, fp32 inside, the
input and an fp32 rstd kept), so no kernel of our own is needed.

Numerics. The fused kernel rounds once, `round(x * rstd * w)`; transformers rounds the normalized input to
the input dtype and then multiplies by the weight, `round(w * round(x * rstd))`. In bf16 the two differ by
at most one bf16 step of the result. On the CPU (and under torch.compile, whose generated kernel fuses the
eager formula anyway) the module runs transformers' formula unchanged, so CPU training keeps its exact
numbers.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

from .start_up_check import passed_on, run_start_up_check, swap_module_class

log = logging.getLogger(__name__)

FUSED_RMS_NORM_ENV = "POSTTRAIN_FUSED_RMS_NORM"  # "0" keeps transformers' eager formula on every device
FUSED_DEVICE_TYPES = ("cuda",)  # where torch's `_fused_rms_norm` is a kernel (on the CPU it is the same eager ops)
_checked: dict[str, str | None] = {}  # device -> None (the start-up check passed) or what went wrong


class DeepseekV3FusedRMSNorm(DeepseekV3RMSNorm):
    """`DeepseekV3RMSNorm` (same parameters, same state-dict keys) that runs `F.rms_norm` where torch fuses it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if fused_rms_norm_usable(hidden_states, self.weight):
            # x and w of one dtype; autocast off so that the kernel sees them as they are (its output is then
            # in x's dtype, like the eager formula's)
            with torch.autocast(hidden_states.device.type, enabled=False):
                return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
        return super().forward(hidden_states)


def fused_rms_norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `F.rms_norm` runs torch's fused kernel on (x, weight) and its start-up check on the device passed."""
    if (x.device.type not in FUSED_DEVICE_TYPES or x.dtype != weight.dtype or weight.device != x.device
            or os.environ.get(FUSED_RMS_NORM_ENV, "1") == "0" or torch.compiler.is_compiling()):
        return False
    return passed_on(x.device, _checked, _start_up_check, "torch's fused RMSNorm",
                     "using transformers' eager RMSNorm there", log)


def _start_up_check(device: torch.device) -> str | None:
    """The fused forward and backward against the formula in float64 on rows of very different scales, the input a
    strided view: the output within one bf16 step, the gradients to bf16 precision. None if they agree, else what
    went wrong."""
    return run_start_up_check(_compare_with_float64, device)


def _compare_with_float64(device: torch.device) -> str | None:
    """The fused forward and backward on `device` next to the float64 formula on the same bf16 inputs."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(48, 320, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-2, 3, (48, 1), generator=g)
    w64 = 1.0 + 0.5 * torch.randn(320, generator=g, dtype=torch.float64)
    gy64 = torch.randn(48, 320, generator=g, dtype=torch.float64)
    # a strided view as input, as kv_a_layernorm gets (the first 512 of kv_a_proj_with_mqa's 576 outputs)
    wide = torch.cat([x64, torch.zeros(48, 64, dtype=torch.float64)], dim=1).to(device, torch.bfloat16)
    x = wide.requires_grad_(True)[:, :320]
    w = w64.to(device, torch.bfloat16).requires_grad_(True)
    y = F.rms_norm(x, (320,), w, 1e-6)
    dx, dw = torch.autograd.grad(y, (wide, w), gy64.to(device, torch.bfloat16))
    dx = dx[:, :320]
    ref_x = x.detach().double().cpu().requires_grad_(True)
    ref_w = w.detach().double().cpu().requires_grad_(True)
    ref = ref_x * torch.rsqrt(ref_x.pow(2).mean(-1, keepdim=True) + 1e-6) * ref_w
    ref_dx, ref_dw = torch.autograd.grad(ref, (ref_x, ref_w), gy64.to(torch.bfloat16).double())
    if y.dtype != torch.bfloat16 or y.shape != x.shape:
        return f"output {y.dtype} {tuple(y.shape)} for bf16 {tuple(x.shape)}"
    step = torch.finfo(torch.bfloat16).eps  # one bf16 step, relative
    if not ((y.double().cpu() - ref).abs() <= step * ref.abs() + 1e-30).all():
        return "forward differs from the formula by more than one bf16 step"
    for name, got, want in (("d input", dx, ref_dx), ("d weight", dw, ref_dw)):
        err = (got.double().cpu() - want).norm() / want.norm()
        if not err <= 4 * step:
            return f"{name} relative error {float(err):.2e}"
    return None


def use_fused_rms_norm(model: nn.Module) -> int:
    """Makes every `DeepseekV3RMSNorm` of `model` a `DeepseekV3FusedRMSNorm` in place: the subclass adds no
    state, so the module keeps its weight Parameter, hooks and state-dict keys (nothing is copied or allocated;
    meta tensors stay meta). Returns how many changed."""
    return swap_module_class(model, DeepseekV3RMSNorm, DeepseekV3FusedRMSNorm)
