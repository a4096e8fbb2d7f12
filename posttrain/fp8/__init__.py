"""FP8 support in DeepSeek-V3's format: fine-grained e4m3 with 128x128 weight blocks and 1x128 activation tiles.

Modules, one job each:

* :mod:`.quant` -- block / tile quantization math (ceil-divided grids, ``ue8m0`` scales); the eager
  reference, chunked (bounded memory) and ``torch.compile``'d (memory-speed) kernels.
* :mod:`.layout` -- which checkpoint tensors are FP8, scale names, index/config files.
* :mod:`.checkpoint` -- load an FP8 checkpoint into high precision and save it back (lossless when unchanged).
* :mod:`.convert` -- streaming fp8 <-> bf16 conversion of whole checkpoints (CLI: ``python -m posttrain.fp8.convert``).
* :mod:`.gemm` -- FP8 GEMM on block-quantized operands (fp32 reference; ``scaled_mm`` on Hopper).
* :mod:`.linear` -- ``FP8Linear`` / ``fp8_linear`` / ``swap_linears_to_fp8`` (report §3.3 training recipe);
  FP8 weights cached once per optimizer step.
* :mod:`.experts` -- the ``"posttrain_fp8"`` experts implementation for transformers' fused MoE experts
  (torch's grouped FP8 GEMM on Hopper, per-expert block-scaled GEMMs elsewhere).
* :mod:`.optim` -- AdamW with bf16 moments (report §3.3.3).
* :mod:`.training` -- wiring into SFT/GRPO: ``fp8: true``, FP8 checkpoints in (our loader) and out (imported on use).
* :mod:`.synthetic` -- random DeepSeek-layout checkpoints for tests and benchmarks.
"""

from .checkpoint import FP8CheckpointMeta, LazyCheckpointTensor, load_fp8_checkpoint, open_fp8_checkpoint, save_fp8_checkpoint
from .experts import EXPERTS_IMPLEMENTATION, enable_fp8_experts, fp8_grouped_linear, grouped_backend, register_fp8_experts
from .layout import fp8_quantization_config, is_fp8_weight_name, scale_name_for
from .linear import FP8Linear, FP8Recipe, clear_weight_cache, fp8_linear, swap_linears_to_fp8
from .optim import AdamWLowPrecisionMoments
from .quant import (
    dequantize_blockwise,
    dequantize_tilewise_act,
    quant_backend,
    quantize_blockwise,
    quantize_tilewise_act,
    scale_grid_shape,
)

_LAZY = {"ConversionStats", "convert_bf16_to_fp8", "convert_fp8_to_bf16"}


def __getattr__(name: str):
    # .convert is imported lazily so `python -m posttrain.fp8.convert` does not import it twice.
    if name in _LAZY:
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdamWLowPrecisionMoments",
    "ConversionStats",
    "EXPERTS_IMPLEMENTATION",
    "FP8CheckpointMeta",
    "FP8Linear",
    "FP8Recipe",
    "clear_weight_cache",
    "convert_bf16_to_fp8",
    "convert_fp8_to_bf16",
    "dequantize_blockwise",
    "dequantize_tilewise_act",
    "enable_fp8_experts",
    "fp8_grouped_linear",
    "fp8_linear",
    "fp8_quantization_config",
    "grouped_backend",
    "is_fp8_weight_name",
    "load_fp8_checkpoint",
    "open_fp8_checkpoint",
    "LazyCheckpointTensor",
    "quant_backend",
    "quantize_blockwise",
    "quantize_tilewise_act",
    "register_fp8_experts",
    "save_fp8_checkpoint",
    "scale_grid_shape",
    "scale_name_for",
    "swap_linears_to_fp8",
]
