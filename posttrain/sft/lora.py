"""LoRA through peft on the MLA projections and the dense / shared-expert MLPs (not the fused routed
experts, not the router), merged back into the full weights on export."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# peft's transformers-v5 MoE target remapping is switched off around LoRA set-up and loading: for V3
# it would put the adapters on the fused routed experts instead of the MLPs the names mean
# (engines.compat.PEFT_CONFIG_CONVERTER)
from engines.compat import plain_lora_targets

from .config import SFTRecipeConfig


def apply_lora(model: torch.nn.Module, cfg: SFTRecipeConfig):
    """Wraps `model` in a peft `PeftModel` with adapters on `cfg.lora_target_modules` (nn.Linear / nn.Embedding modules)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, cfg.lora_target_modules)
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
    record_base_model(peft_model, cfg.model_name_or_path)
    if cfg.gradient_checkpointing:
        # checkpointed blocks need an input that requires grad when the embeddings are frozen
        peft_model.enable_input_require_grads()
    return peft_model


def record_base_model(peft_model, name_or_path: str | None) -> None:
    """The base the checkpoints' adapter_config.json names (`base_model_name_or_path`): `name_or_path`, the
    path the run loaded, absolute when it is a local directory (a Hub id stays as it is). peft records the
    model's `name_or_path` as typed (runs/tiny-model, not found from another working directory), and
    "None" for an FP8 base (`load_pretrained` builds that model from a state dict)."""
    for adapter in peft_model.peft_config.values():
        base = name_or_path or adapter.base_model_name_or_path
        if base and Path(base).expanduser().is_dir():
            base = os.path.abspath(Path(base).expanduser())
        adapter.base_model_name_or_path = base


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Each name in `targets` must match (as peft matches a list: the module's name or its last dotted parts)
    at least one module, and only modules LoRA can wrap here (nn.Linear, nn.Embedding). peft itself skips a
    name that matches nothing as long as another name matches, and fails with a traceback otherwise."""
    from ..errors import ConfigError

    wraps = (torch.nn.Linear, torch.nn.Embedding)
    modules = list(model.named_modules())
    wrappable = sorted({name.rsplit(".", 1)[-1] for name, m in modules if isinstance(m, wraps)})
    for target in targets:
        hits = [m for name, m in modules if name == target or name.endswith("." + target)]
        if not hits:
            raise ConfigError(f"lora_target_modules: {target!r} names no module of this model; LoRA can wrap "
                              f"{', '.join(wrappable)}")
        if kinds := sorted({type(m).__name__ for m in hits if not isinstance(m, wraps)}):
            raise ConfigError(f"lora_target_modules: {target!r} names {', '.join(kinds)} module(s), which LoRA cannot "
                              f"wrap (the fused routed experts and the router stay frozen under LoRA); it can wrap "
                              f"{', '.join(wrappable)}")


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model with any LoRA adapters merged into its weights (in place)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
