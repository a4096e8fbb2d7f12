"""Token counts for output metadata when the teacher does not report them: counted with
the tokenizer at ``model_name_or_path`` if that is a loadable local tokenizer, else None."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TokenCounter:
    def __init__(self, name_or_path: str | None):
        self.tokenizer = None
        if name_or_path and Path(name_or_path).is_dir():  # never reach for the network here
            try:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            except (OSError, ValueError) as e:
                log.warning("no tokenizer at %s (%s); token counts will be null", name_or_path, e)

    @property
    def available(self) -> bool:
        return self.tokenizer is not None

    def completion(self, text: str) -> int | None:
        if self.tokenizer is None:
            return None
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, messages: list[dict[str, Any]]) -> int | None:
        if self.tokenizer is None:
            return None
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.completion("\n".join(str(m.get("content", "")) for m in messages))
