"""AdamW with low-precision moments (DeepSeek-V3 report §3.3.3 "Low-Precision Optimizer States").

The report tracks AdamW's first and second moments in BF16 while master weights and
gradients stay FP32. torch's ``AdamW`` has no option for the state dtype, so this is a
small single-tensor implementation: moments are stored in ``moment_dtype`` and every
update is computed in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with ``exp_avg``/``exp_avg_sq`` kept in ``moment_dtype``."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        moment_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError("invalid AdamW hyper-parameters")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, moment_dtype=moment_dtype)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded floating-point state to the parameter's dtype; the moments go back to ``moment_dtype``."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = state[key].to(group["moment_dtype"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, mdt = group["lr"], group["eps"], group["weight_decay"], group["moment_dtype"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                m = state["exp_avg"].float().mul_(beta1).add_(g, alpha=1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                bc1, bc2 = 1 - beta1**t, 1 - beta2**t
                update = (m / bc1) / ((v / bc2).sqrt_().add_(eps))
                p32 = p.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                p32.add_(update, alpha=-lr)
                p.copy_(p32)
        return loss
