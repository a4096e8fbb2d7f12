"""Teacher on plain ``transformers`` ``generate``: an adapter over ``engines.hf.HFGenerateEngine``
(left-padded batches, per-prompt seeds) with the model's chat template and tokenizer.

The slow, dependency-light reference for the vLLM backend: same prompts, same chat
template, same sampling settings.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import DataError
from .base import Completion, Messages, SamplingSettings


class HFTeacher:
    def __init__(self, model: str, *, dtype: str = "auto", batch_size: int = 8, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engines.hf import HFGenerateEngine

        self.name = f"hf:{model}"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise DataError(f"backend 'hf': cannot load model {model!r}: {e}") from None
        lm.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.engine = HFGenerateEngine(lm, pad, [tok.eos_token_id], batch_size=batch_size)

    def _encode(self, prompt: Messages) -> list[int]:
        ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def generate(self, prompts: Sequence[Messages], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        encoded = [self._encode(p) for p in prompts]
        groups = self.engine.generate(encoded, n, sampling)
        for ids, group in zip(encoded, groups):
            for c in group:
                c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                c.completion_tokens, c.prompt_tokens = len(c.token_ids), len(ids)
        return groups

    def close(self) -> None:
        self.engine = None
