"""Sample-masked SFT of the whole DeepSeek-V3 model (report §5.2), MTP (§2.2) and routing balance
(§2.1.2) included. Entry point: `run_sft(SFTRecipeConfig(...))`."""

from .config import DEFAULT_LORA_TARGETS, SFTRecipeConfig
from .run import build_trainer, run_sft

__all__ = ["DEFAULT_LORA_TARGETS", "SFTRecipeConfig", "build_trainer", "run_sft"]
