"""vLLM engine construction for posttrain: the implementation lives upstream in
`data_pipelines.vllm_engine` (the distillation teachers need it too)."""

from data_pipelines.capabilities import fp8_kernel_problem, vllm_has_fp8_kernels
from data_pipelines.vllm_engine import (
    fp8_fallback_reason,
    keep_cpu_linear_weights,
    make_llm,
    on_cpu,
    patch_vllm_cpu_rope,
    vllm_engine_kwargs,
)

__all__ = ["make_llm", "vllm_engine_kwargs", "on_cpu", "patch_vllm_cpu_rope", "keep_cpu_linear_weights",
           "fp8_kernel_problem", "fp8_fallback_reason", "vllm_has_fp8_kernels"]
