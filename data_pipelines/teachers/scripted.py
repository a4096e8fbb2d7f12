"""The built-in teacher: R1-style traces for ``builtin:arith`` problems, written by
:func:`data_pipelines.arith_task.scripted_trace`.  Synthetic — its output metadata says so.

A sample is wrong with probability ``wrong_fraction``, decided by an RNG seeded from
(seed, problem text, sample index) only, so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from ..arith_task import parse_problem, scripted_trace
from ..errors import DataError
from .base import Completion, Messages, SamplingSettings

SCRIPTED_NAME = "scripted (synthetic)"


class ScriptedTeacher:
    name = SCRIPTED_NAME

    def __init__(self, wrong_fraction: float = 0.0):
        if not 0.0 <= wrong_fraction <= 1.0:
            raise DataError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}")
        self.wrong_fraction = wrong_fraction

    def _one(self, prompt: Messages, index: int, seed: int) -> Completion:
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        problem = users[-1] if users else ""
        try:
            operands, ops = parse_problem(problem)
        except (ValueError, IndexError):
            raise DataError("the scripted teacher only answers builtin:arith problems; cannot parse "
                            f"prompt {problem[:80]!r}") from None
        key = hashlib.sha1(f"{seed}|{problem}|{index}".encode()).hexdigest()
        rng = random.Random(key)
        wrong = rng.random() < self.wrong_fraction
        text = scripted_trace({"problem": problem, "operands": operands, "ops": ops}, rng, wrong=wrong)
        return Completion(text=text, finish_reason="stop")

    def generate(self, prompts: Sequence[Messages], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        return [[self._one(p, i, sampling.seed) for i in range(n)] for p in prompts]

    def close(self) -> None:
        pass
