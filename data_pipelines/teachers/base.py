"""The one interface every teacher backend implements."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; defaults follow DeepSeek-R1's usage recommendations
    (temperature 0.6, top-p 0.95, several samples per prompt)."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int = 0


@dataclass
class Completion:
    text: str
    completion_tokens: int | None = None  # from the teacher's tokenizer when it has one
    prompt_tokens: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | None (unknown)


class Teacher(Protocol):
    name: str  # recorded in every output row ("scripted (synthetic)", "vllm:/path", …)

    def generate(self, prompts: Sequence[Messages], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order."""
        ...

    def close(self) -> None: ...


def sample_seed(seed: int, prompt: Messages, index: int) -> int:
    """A per-(prompt, sample) seed, so results do not depend on batching or resumption."""
    key = json.dumps([seed, prompt, index], sort_keys=True, ensure_ascii=True)
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") & 0x7FFFFFFF


def prompt_seed(seed: int, prompt: Messages) -> int:
    return sample_seed(seed, prompt, -1)


def fingerprint(obj: Any) -> str:
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
