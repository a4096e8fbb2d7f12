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

What λ does not move: the MTP loss is the only gradient the MTP module's own weights get, and Adam divides
each weight's step by the running size of its gradient, so λ changes how fast those weights move only until
Adam's second moment catches up. λ sets how hard the MTP loss pulls the trunk, embedding and lm_head it
shares with the policy; how fast the drafter follows the policy is its learning rate, `mtp_learning_rate`
(`split_mtp_param_groups`). In a demo run at the policy's lr, λ sat at its ceiling for the last 14 steps and
acceptance stayed 2 points below its start (benchmarks/RESULTS.md, issue #12).
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


def split_mtp_param_groups(optimizer: Any, model: Any, mtp_learning_rate: float) -> int:
    """Moves the MTP module's own weights (`model.mtp_layers`; the embedding and lm_head it shares with the
    main model stay) out of the optimizer's groups into copies of those groups at `mtp_learning_rate`, before
    the scheduler records each group's initial lr. Idempotent; returns the number of weights moved."""
    mtp_ids = {id(p) for layer in model.mtp_layers for p in layer.parameters()}
    if any(group.get("mtp") for group in optimizer.param_groups):
        return 0
    moved, new_groups = 0, []
    for group in list(optimizer.param_groups):
        mtp = [p for p in group["params"] if id(p) in mtp_ids]
        if not mtp:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in mtp_ids]
        new_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mtp,
                           "lr": mtp_learning_rate, "mtp": True})
        moved += len(mtp)
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    for group in new_groups:
        optimizer.add_param_group(group)
    return moved


__all__ = ["MTPWeightController", "split_mtp_param_groups"]
