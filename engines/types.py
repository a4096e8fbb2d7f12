"""The sampling and completion types every generator shares: distillation teachers, GRPO rollouts,
the generative judge and evaluation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

Messages = list[dict[str, Any]]


@dataclass
class SamplingSettings:
    """What every engine honours. `logprobs` are after temperature (vLLM's `processed_logprobs`),
    the same distribution the trainer scores with TRL's temperature-scaled head.

    `seed` None samples freshly; an int seeds each prompt by `prompt_seed`, so a prompt's samples do
    not depend on the batch it came in, on the engine's other requests or on the number of ranks."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # benchmarks: every completion runs to max_tokens
    # The sampled tokens' log-probs (GRPO's importance-sampling correction needs them). Off, `Completion.logprobs`
    # is None: evaluation turns them off, as they cost (benchmarks/bench_eval_sampling.py).
    logprobs: bool = True


@dataclass
class Completion:
    """One sampled continuation. Token-level engines fill `token_ids` and `logprobs`; text-level ones
    (chat teachers, an OpenAI-compatible server) fill `text` and the token counts they know."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # of each sampled token; None when the engine cannot give them
    finish_reason: str | None = None  # "stop" | "length" | None (unknown)
    text: str = ""
    completion_tokens: int | None = None  # None: unknown (the caller may count with a tokenizer)
    prompt_tokens: int | None = None


def prompt_seed(seed: int, prompt: Sequence[int] | Messages | str, index: int | None = None) -> int:
    """A sampling seed for one prompt (token ids, chat messages or text), and with `index` for one
    sample of it: the same prompt and seed give the same completions whatever else is generated."""
    if isinstance(prompt, str):
        key = f"{seed}|{json.dumps(prompt, ensure_ascii=True)}"
    elif all(isinstance(t, int) for t in prompt):
        key = f"{seed}|{','.join(map(str, prompt))}"
    else:
        key = f"{seed}|{json.dumps(prompt, sort_keys=True, ensure_ascii=True)}"
    if index is not None:
        key += f"|{index}"
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") & 0x7FFFFFFF


class RolloutEngine(Protocol):
    """A token-level generator that can take new weights: the GRPO rollout and evaluation interface."""

    name: str

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        """`n` completions for each prompt, in prompt order."""
        ...

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load these DeepSeek-layout (name, tensor) pairs; returns the seconds it took."""
        ...

    def close(self) -> None: ...


__all__ = ["Completion", "Messages", "RolloutEngine", "SamplingSettings", "prompt_seed"]
