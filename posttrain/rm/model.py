"""The reward model's network: a DeepSeek-V3 backbone with a scalar head (report §5.2.1: the RM is
built from the V3 SFT checkpoints).

`DeepseekV3ForSequenceClassification` with `num_labels=1` loaded from a causal-LM checkpoint: the
backbone (MLA, dense and MoE layers, router and its correction bias) comes from the checkpoint,
the `score` head (hidden → 1, no bias) is new. The head reads the hidden state of the last token
that is not `pad_token_id`, so the config must carry the tokenizer's pad id — with none,
transformers reads position -1, which is a pad token in every right-padded row of a batch.

The checkpoint's `lm_head` and MTP module (`model.layers.{num_hidden_layers}`) have no place in a
sequence classifier and are not loaded; the saved RM has neither.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..modeling import use_fused_kernels

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    """The backbone's tokenizer with a pad token (eos when the tokenizer has none)."""
    from ..tokenizer import load_checkpoint_tokenizer

    local = Path(path).expanduser()
    if not local.exists() and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
        raise UserError(f"model_name_or_path {path}: no such directory")
    tok = load_checkpoint_tokenizer(path)
    if not getattr(tok, "chat_template", None):
        raise UserError(f"model_name_or_path {path}: the tokenizer has no chat template; the RM reads "
                        "prompt + response through it")
    return tok


def load_reward_backbone(path: str, tokenizer: Any, **model_kwargs: Any):
    """`DeepseekV3ForSequenceClassification(num_labels=1)` from a V3 checkpoint (causal LM or RM)."""
    from transformers import AutoConfig, DeepseekV3ForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ..fp8.training import load_pretrained

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model_name_or_path {path}: not a model checkpoint: {e}") from None
    n_main, n_mtp = config.num_hidden_layers, getattr(config, "num_nextn_predict_layers", 0) or 0
    # Expected differences from a causal-LM checkpoint: the new head, and the LM head / MTP layer(s)
    # that a classifier does not have. Anything else missing is still reported by transformers.
    mtp_layers = "|".join(str(n_main + k) for k in range(max(n_mtp, 1)))
    ignore_unexpected = [r"^lm_head\.", rf"^model\.layers\.({mtp_layers})\."]
    ignore_missing = [r"^score\.weight$"]
    cls = DeepseekV3ForSequenceClassification
    saved = cls._keys_to_ignore_on_load_unexpected, cls._keys_to_ignore_on_load_missing
    cls._keys_to_ignore_on_load_unexpected = list(saved[0] or []) + ignore_unexpected
    cls._keys_to_ignore_on_load_missing = list(saved[1] or []) + ignore_missing
    verbosity = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()  # the load report would list exactly the keys ignored above
        # DeepSeek's FP8 checkpoints (the released V3, an `fp8: true` SFT output) dequantized by our
        # loader, as SFT and GRPO load them; transformers' own FP8 path cannot load one for training
        config.num_labels = 1  # on the config: the FP8 path builds the model from it
        # a checkpoint of another model_type is refused there (check_checkpoint), as for SFT and GRPO
        model = load_pretrained(cls, path, config=config, **model_kwargs)
    finally:
        cls._keys_to_ignore_on_load_unexpected, cls._keys_to_ignore_on_load_missing = saved
        hf_logging.set_verbosity(verbosity)
    use_fused_kernels(model)  # the fused kernels on CUDA; transformers' own code elsewhere
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.architectures = [cls.__name__]
    model.config.num_nextn_predict_layers = 0  # no MTP module is loaded or saved: the config must not promise one
    for key in ("topk_method", "scoring_func"):  # keep what vLLM / the V3 layout read from config.json
        if hasattr(config, key):
            setattr(model.config, key, getattr(config, key))
    log.info("reward model: %s + scalar head (%d parameters)", path, sum(p.numel() for p in model.parameters()))
    return model

