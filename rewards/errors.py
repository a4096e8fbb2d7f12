"""The one exception type the rewards package raises for reward failures, and the value a reward
returns for one row it could not score."""

from __future__ import annotations

from typing import Any


class RewardError(Exception):
    """A reward could not be resolved or could not score a batch.

    Messages name the reward, and where it applies the row index and the cause, so a
    failed GRPO step or distillation run can be traced to one completion.
    """


class RowFailure(float):
    """A reward value meaning "this row could not be scored", with the reason.

    It is a float NaN, so it fits the ``list[float | None]`` contract everywhere (TRL treats NaN
    like None); the scoring layer (:class:`rewards.RewardSuite`, :class:`rewards.GuardedReward`)
    reports it as a failure of that row only, naming ``cause``, under the failure policy: the
    row becomes None under ``policy="skip"``, ``policy="error"`` raises :class:`RewardError`.
    Use it when one bad row (say, malformed test cases) must not fail the whole batch.
    """

    cause: str

    def __new__(cls, cause: str) -> RowFailure:
        self = super().__new__(cls, "nan")
        self.cause = cause
        return self

    def __repr__(self) -> str:
        return f"RowFailure({self.cause!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RowFailure, (self.cause,))
