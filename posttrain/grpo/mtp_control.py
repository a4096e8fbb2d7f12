"""Closed-loop MTP loss weight for GRPO (`mtp_loss_weight: auto`).

The MTP module is what a speculative decoder drafts with (DeepSeek-V3 report §2.2: MTP "can also be
repurposed for speculative decoding"; §5.4.3: the second token is accepted 85–90% of the time, which
makes decoding 1.8× faster). During GRPO the policy moves away from the distribution the MTP module
was trained on, so its acceptance falls unless the MTP loss keeps training it — and every unit of λ
spent on that loss is gradient not spent on the policy (and, with a shared trunk, pulls the trunk's
hidden states toward the MTP objective). The controller spends the least λ that holds acceptance:

- target: the mean acceptance of the first `warmup_steps` steps (the start of GRPO), unless given;
- after each step, the acceptance is smoothed (exponential moving average, `smoothing`) and
  λ ← min(λ · up, ceiling) while the smoothed acceptance is below the target,
  λ ← max(λ · down, floor) while it is at or above it;
- λ starts at `initial` (0.3, the report's pre-training value) and stays there during warm-up.

Multiplicative steps keep λ positive and bounded whatever the measurements. With `up` = 1.5 and
`down` = 0.9, λ is steady (in log terms) where the smoothed acceptance is below the target on a
fraction ln(1/0.9) / (ln 1.5 + ln(1/0.9)) ≈ 21% of steps: the loop holds acceptance at or above its
start about four steps in five, and spends less λ whenever acceptance holds more often than that. Unit-tested on synthetic acceptance series in
tests/test_mtp_control.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MTPWeightController:
    initial: float = 0.3
    floor: float = 0.05  # GRPOConfig.mtp_loss_weight_min
    ceiling: float = 1.0
    up: float = 1.5
    down: float = 0.9
    warmup_steps: int = 5
    smoothing: float = 0.5  # weight of the previous average in the EMA
    target: float | None = None
    # state
    weight: float = field(default=-1.0)
    smoothed: float | None = None
    steps: int = 0
    warmup: list[float] = field(default_factory=list)

    def __post_init__(self):
        if not 0 <= self.floor <= self.ceiling:
            raise ValueError("need 0 <= floor <= ceiling")
        if self.weight < 0:
            self.weight = min(max(self.initial, self.floor), self.ceiling)

    def update(self, accept_rate: float | None) -> float:
        """Feed one step's measured acceptance (None: not measured this step); returns the λ for the
        next step."""
        if accept_rate is None or accept_rate != accept_rate:  # None or NaN
            return self.weight
        self.steps += 1
        if self.target is None:
            self.warmup.append(float(accept_rate))
            if len(self.warmup) < self.warmup_steps:
                return self.weight
            self.target = sum(self.warmup) / len(self.warmup)
            self.smoothed = self.target
            return self.weight
        if self.smoothed is None:
            self.smoothed = float(accept_rate)
        else:
            self.smoothed = self.smoothing * self.smoothed + (1 - self.smoothing) * float(accept_rate)
        if self.smoothed < self.target:
            self.weight = min(max(self.weight, 1e-3) * self.up, self.ceiling)
        else:
            self.weight = max(self.weight * self.down, self.floor)
        return self.weight

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if hasattr(self, k):
                setattr(self, k, v)


__all__ = ["MTPWeightController"]
