"""Starting a vLLM engine with settings that work on both its CPU build and GPUs."""

from __future__ import annotations

import os
from typing import Any


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def vllm_engine_kwargs(
    model: str,
    dtype: str = "float32",
    max_model_len: int = 1024,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.5,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`.

    On CPU: eager mode (compilation costs more than it saves at this size), a small KV cache
    unless the user set `VLLM_CPU_KVCACHE_SPACE`, and in fp32 the reference `CPU_MLA` attention
    backend — the AMX MLA backend vLLM prefers where the CPU has AMX only takes bf16 weights.
    """
    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
    )
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kwargs["enforce_eager"] = True
        if dtype in ("float32", "fp32"):
            kwargs["attention_config"] = {"backend": "CPU_MLA"}
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    kwargs.update(extra)
    return kwargs


def make_llm(model: str, **kwargs: Any):
    """A `vllm.LLM` for `model` (a local Hugging Face directory). Call under `if __name__ == "__main__":`."""
    from vllm import LLM

    return LLM(**vllm_engine_kwargs(model, **kwargs))
