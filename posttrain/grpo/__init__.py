"""GRPO (DeepSeekMath §4.1, DeepSeek-R1 §2.2.1) on the whole V3 model, built on TRL's GRPOTrainer."""

from .config import GRPORecipeConfig

__all__ = ["GRPORecipeConfig"]
