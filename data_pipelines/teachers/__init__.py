"""Teacher backends behind one interface: ``generate(prompts, n, sampling)``.

``scripted`` (built-in, synthetic), ``vllm`` (offline engine), ``hf`` (transformers
``generate``), ``openai`` (any OpenAI-compatible endpoint).  Backends import their heavy
dependencies only when built.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .base import Completion, Messages, SamplingSettings, Teacher

BACKENDS = ("scripted", "vllm", "hf", "openai")


def make_teacher(cfg: Any) -> Teacher:
    """Build the teacher a :class:`~data_pipelines.distill.DistillConfig` asks for."""
    backend = cfg.backend
    if backend == "scripted":
        from .scripted import ScriptedTeacher

        return ScriptedTeacher(wrong_fraction=cfg.wrong_fraction)
    if backend not in BACKENDS:
        raise DataError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not cfg.model_name_or_path:
        raise DataError(f"backend {backend!r} needs model_name_or_path")
    if backend == "vllm":
        from .vllm_backend import VLLMTeacher

        return VLLMTeacher(cfg.model_name_or_path, tensor_parallel_size=cfg.tensor_parallel_size,
                           dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed,
                           llm_kwargs=cfg.vllm_kwargs)
    if backend == "hf":
        from .hf_backend import HFTeacher

        return HFTeacher(cfg.model_name_or_path, dtype=cfg.dtype, batch_size=cfg.generation_batch_size)
    from .openai_backend import OpenAITeacher

    return OpenAITeacher(cfg.api_base, cfg.model_name_or_path, api_key_env=cfg.api_key_env,
                         max_concurrency=cfg.max_concurrency, max_retries=cfg.max_retries,
                         request_timeout=cfg.request_timeout, backoff_base=cfg.retry_backoff)


__all__ = ["BACKENDS", "Completion", "Messages", "SamplingSettings", "Teacher", "make_teacher"]
