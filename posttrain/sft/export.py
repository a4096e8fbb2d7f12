"""Writing the SFT result: the model in the DeepSeek checkpoint layout (per-expert names, MTP module
at `model.layers.{num_hidden_layers}`, the routers' updated `e_score_correction_bias`) + tokenizer,
loadable by transformers (`DeepseekV3ForCausalLM`, `DeepseekV3ForCausalLMWithMTP`) and vLLM."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fp8.training import finalize_fp8_export
from ..modeling import DeepseekV3ForCausalLMWithMTP
from .lora import merged_model


def export_trained_model(trainer, output_dir: str | Path) -> Path | None:
    """Writes the trainer's model; every rank calls it. Returns the directory on rank 0, else None.

    Under FSDP2 the parameters are shards: the trainer's `save_model` (`DeepSeekLayoutCheckpoints`)
    gathers the full state dict and rank 0 writes it through the model's `save_pretrained`, so the
    directory is the same DeepSeek layout as a single-process run's."""
    from ..distributed import model_is_sharded
    from ..errors import UserError

    out = Path(output_dir)
    if model_is_sharded(trainer.model):
        from peft import PeftModel

        if isinstance(trainer.model, PeftModel):
            raise UserError("LoRA under FSDP is not supported: merge needs the full model on one rank")
        trainer.save_model(str(out))
        if not trainer.is_world_process_zero():
            return None
        finalize_fp8_export(trainer.model, out)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(out)
        return out
    if not trainer.is_world_process_zero():
        return None
    return export_model(trainer.model, trainer.processing_class, out)


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
