"""`dsv3-posttrain init-model`: write a randomly initialised V3-architecture checkpoint.

The tiny preset is the embedded default: model + locally trained tokenizer in one Hugging Face
directory that transformers and vLLM load. The deepseek-v3 preset is built on the meta device
only (no weights), to check recipes and memory plans without hardware.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .errors import ConfigError
from .modeling import DeepseekV3ForCausalLMWithMTP
from .presets import PRESETS, preset_config
from .tokenizer import SPECIAL_TOKENS, train_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_CORPUS_SIZE = 20000
# The byte-level BPE starts from its 256-symbol byte alphabet plus the special tokens: the smallest
# vocabulary it can have (no merges). Asked for less, the trainer silently returns this many.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def check_vocab_size(vocab_size: int) -> None:
    """A `ConfigError` for a vocabulary smaller than the tokenizer's alphabet + special tokens."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size: {vocab_size!r} is too small; the byte-level tokenizer needs at least "
                          f"{MIN_VOCAB_SIZE} (256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)")


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """The embedded tokenizer, trained on the built-in task's text (deterministic for a seed)."""
    from data_pipelines.arith_task import task_corpus

    check_vocab_size(vocab_size)

    return train_tokenizer(task_corpus(TOKENIZER_CORPUS_SIZE, seed=seed), vocab_size=vocab_size)


def build_meta_model(preset: str, **overrides) -> DeepseekV3ForCausalLMWithMTP:
    """The preset's model with every tensor on the meta device (no memory, no weights)."""
    config = preset_config(preset, **overrides)
    with torch.device("meta"):
        return DeepseekV3ForCausalLMWithMTP(config)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total, of the MTP module(s), of the main model, and the main model's
    parameters activated per token (all but the routed experts a token does not pick)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for layer in model.mtp_layers for p in layer.parameters())
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    inactive = n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    return {"total": total, "mtp": mtp, "main": total - mtp, "activated": total - mtp - inactive}


def init_model(
    preset: str = "tiny",
    output_dir: str | os.PathLike = "runs/tiny-model",
    seed: int = 0,
    vocab_size: int = 1024,
    dtype: str = "float32",
) -> Path:
    """Writes model + tokenizer for `preset` to `output_dir` and returns the directory.

    For presets too large to materialise (deepseek-v3) only `config.json` and a parameter count
    are written.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if preset != "deepseek-v3":  # the only preset without the embedded tokenizer
        check_vocab_size(vocab_size)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if preset == "deepseek-v3":
        model = build_meta_model(preset)
        model.config.architectures = ["DeepseekV3ForCausalLM"]
        model.config.save_pretrained(out)
        counts = count_parameters(model)
        (out / "parameter_count.json").write_text(json.dumps(counts, indent=2) + "\n")
        log.info("deepseek-v3 built on the meta device: %s", counts)
        return out

    tokenizer = build_tokenizer(vocab_size=vocab_size, seed=seed)
    config = preset_config(
        preset,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLMWithMTP(config).to(getattr(torch, dtype))
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
