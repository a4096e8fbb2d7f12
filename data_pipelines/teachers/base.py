"""The one interface every teacher backend implements, on the shared engine types
(`engines.types`: `SamplingSettings`, `Completion`, `prompt_seed`)."""

from __future__ import annotations

from typing import Protocol, Sequence

from engines.types import Completion, Messages, SamplingSettings


class Teacher(Protocol):
    name: str  # recorded in every output row ("scripted (synthetic)", "vllm:/path", …)

    def generate(self, prompts: Sequence[Messages], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order, with ``text`` filled in."""
        ...

    def close(self) -> None: ...


__all__ = ["Completion", "Messages", "SamplingSettings", "Teacher"]
