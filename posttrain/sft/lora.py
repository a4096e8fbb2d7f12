"""LoRA through peft on the MLA projections and the dense / shared-expert MLPs (not the fused routed
experts, not the router), merged back into the full weights on export."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .config import SFTRecipeConfig


@contextlib.contextmanager
def plain_lora_targets() -> Iterator[None]:
    """Disables peft's transformers-v5 MoE target remapping (peft 0.21.2, `utils/transformers_weight_conversion`).

    For model types whose experts transformers v5 fused (deepseek_v3 maps to the qwen2_moe pattern), peft
    rewrites the target names `gate_proj` / `up_proj` / `down_proj` into `target_parameters` on the fused
    routed experts and drops them from `target_modules` — so the dense and shared-expert MLPs would get
    no adapter and the routed experts would. Here those names mean the `nn.Linear` modules they name.
    peft looks the functions up at call time, so patching the module attributes is enough.
    """
    import peft.utils.transformers_weight_conversion as conv

    saved = (conv.convert_peft_config_for_transformers, conv.convert_peft_adapter_state_dict_for_transformers)
    conv.convert_peft_config_for_transformers = lambda peft_config, model, conversions=None: None
    conv.convert_peft_adapter_state_dict_for_transformers = (
        lambda model, peft_config, adapter_state_dict, adapter_name="default": adapter_state_dict
    )
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers, conv.convert_peft_adapter_state_dict_for_transformers = saved


def apply_lora(model: torch.nn.Module, cfg: SFTRecipeConfig):
    """Wraps `model` in a peft `PeftModel` with adapters on `cfg.lora_target_modules` (nn.Linear only)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with plain_lora_targets():
        peft_model = get_peft_model(model, config)
    if cfg.gradient_checkpointing:
        # checkpointed blocks need an input that requires grad when the embeddings are frozen
        peft_model.enable_input_require_grads()
    return peft_model


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model with any LoRA adapters merged into its weights (in place)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
