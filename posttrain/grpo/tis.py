"""Truncated importance sampling (TIS) against the engine's sampling log-probs, with the old policy's
log-probs taken from the training forward.

The engine samples from its own copy of the weights (another kernel, dtype or FP8), so each token's
loss is weighted by π_old(token) / π_engine(token), truncated or masked (TRL's
`vllm_importance_sampling_*` options). With vLLM, TRL scores π_old in a separate no-grad forward over
the whole generation batch before the loss, the groups dynamic sampling drops included. When the
rollouts are on-policy (each optimizer step trains only on rollouts generated at its start: TRL's
`gradient_accumulation_steps % (steps_per_generation * num_iterations) == 0`), π_old is the policy of
the training forward itself, and TRL already uses that forward's detached log-probs as π_old when it
samples without vLLM. `V3GRPOTrainer` (`old_logps_from_training_forward`) does the same with an engine:
the ratio below is computed from the training forward's detached log-probs, inside the loss, and
the separate forward is not run.

`importance_ratio` follows TRL 1.16's rule (`GRPOTrainer._generate_and_score_completions`);
tests/test_tis.py checks it against TRL's own on one batch, in every mode.
"""

from __future__ import annotations

import math

import torch

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_ratio(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                     clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """π_old / π_engine per token ([B, T], `token_*` modes) or per sequence ([B, 1], `sequence_*`: the
    product over its tokens), truncated into [clip_min, clip_max] (`*_truncate`) or set to 0 outside it
    (`*_mask`; a missing bound is open). Tokens the engine could not score (NaN) count as agreeing."""
    if mode not in MODES:
        raise ValueError(f"vllm_importance_sampling_mode={mode!r}: use one of {', '.join(MODES)}")
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


class AgreementStats:
    """The train/engine agreement of one optimizer step's micro-batches (or one eval batch), logged once
    as TRL logs it per generation batch: `sampling/sampling_logp_difference/{mean,max}` (|log π_old −
    log π_engine| over completion tokens the engine scored) and `sampling/importance_sampling_ratio/
    {min,mean,max}` (over completion tokens, or over sequences in the `sequence_*` modes). Kept on the
    tensors' device: no host sync until `metrics()`."""

    def __init__(self) -> None:
        self.totals: torch.Tensor | None = None  # [sum |Δ|, tokens, max |Δ|, min ratio, sum ratio, ratios, max ratio]

    @property
    def empty(self) -> bool:
        return self.totals is None

    def add(self, old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, ratio: torch.Tensor,
            per_sequence: bool) -> None:
        """One micro-batch: `ratio` as `importance_ratio` gave it, per token or (`per_sequence`) per sequence."""
        with torch.no_grad():
            valid = mask.bool()
            delta = (old_logps.double() - sampling_logps.double()).abs()
            delta = torch.where(valid & ~torch.isnan(delta), delta, torch.nan)
            flat = ratio.double().flatten() if per_sequence else torch.where(valid, ratio.double(), torch.nan)
            row = torch.stack([
                delta.nansum(), (~torch.isnan(delta)).sum().double(), delta.nan_to_num(-math.inf).max(),
                flat.nan_to_num(math.inf).min(), flat.nansum(), (~torch.isnan(flat)).sum().double(),
                flat.nan_to_num(-math.inf).max(),
            ])
        self.totals = row if self.totals is None else combine(torch.stack([self.totals, row]))

    def metrics(self, gather=None, device: torch.device | str = "cpu") -> dict[str, float]:
        """The metrics over this process's batches, or with `gather` (accelerate's: [7] -> [ranks * 7]) over
        every rank's; 0.0 where there was nothing to measure, as TRL logs them. Resets the totals."""
        totals = self.totals if self.totals is not None else \
            torch.tensor([0.0, 0.0, -math.inf, math.inf, 0.0, 0.0, -math.inf], dtype=torch.float64, device=device)
        self.totals = None
        if gather is not None:
            totals = combine(gather(totals).view(-1, 7))
        s = totals.tolist()
        return {
            "sampling/sampling_logp_difference/mean": s[0] / s[1] if s[1] else 0.0,
            "sampling/sampling_logp_difference/max": s[2] if s[1] else 0.0,
            "sampling/importance_sampling_ratio/min": s[3] if s[5] else 0.0,
            "sampling/importance_sampling_ratio/mean": s[4] / s[5] if s[5] else 0.0,
            "sampling/importance_sampling_ratio/max": s[6] if s[5] else 0.0,
        }


def combine(rows: torch.Tensor) -> torch.Tensor:
    """AgreementStats totals of several batches or ranks ([n, 7]) as one."""
    return torch.stack([rows[:, 0].sum(), rows[:, 1].sum(), rows[:, 2].max(), rows[:, 3].min(), rows[:, 4].sum(),
                        rows[:, 5].sum(), rows[:, 6].max()])
