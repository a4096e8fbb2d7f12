"""Writing the SFT result: the model in the DeepSeek checkpoint layout (per-expert names, MTP module
at `model.layers.{num_hidden_layers}`, the routers' updated `e_score_correction_bias`) + tokenizer,
loadable by transformers (`DeepseekV3ForCausalLM`, `DeepseekV3ForCausalLMWithMTP`) and vLLM."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fp8.training import finalize_fp8_export
from ..modeling import DeepseekV3ForCausalLMWithMTP
from .lora import merged_model


def export_model(model: torch.nn.Module, tokenizer, output_dir: str | Path) -> Path:
    """Merges LoRA adapters if any, then `save_pretrained` (DeepSeek layout) + the tokenizer."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = merged_model(model)
    if not isinstance(model, DeepseekV3ForCausalLMWithMTP):
        raise TypeError(f"expected DeepseekV3ForCausalLMWithMTP, got {type(model).__name__}")
    model.save_pretrained(out)
    finalize_fp8_export(model, out)  # loaded from an FP8 checkpoint: written back as FP8
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
