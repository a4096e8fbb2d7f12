"""Teacher on plain ``transformers`` ``generate`` (sampling, left-padded batches).

The slow, dependency-light reference for the vLLM backend: same prompts, same chat
template, same sampling settings.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import DataError
from .base import Completion, Messages, SamplingConfig, prompt_seed


class HFTeacher:
    def __init__(self, model: str, *, dtype: str = "auto", batch_size: int = 8, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"hf:{model}"
        self.torch = torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise DataError(f"backend 'hf': cannot load model {model!r}: {e}") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = max(1, batch_size)

    def _encode(self, prompts: Sequence[Messages]) -> list[list[int]]:
        out = []
        for p in prompts:
            ids = self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        return out

    def generate(self, prompts: Sequence[Messages], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        torch, tok = self.torch, self.tokenizer
        encoded = self._encode(prompts)
        eos = tok.eos_token_id
        results: list[list[Completion]] = []
        # A fixed number of prompts per micro-batch; n samples each via num_return_sequences.
        per_batch = max(1, self.batch_size // n) if self.batch_size >= n else 1
        for start in range(0, len(prompts), per_batch):
            chunk = encoded[start:start + per_batch]
            width = max(len(x) for x in chunk)
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, ids in enumerate(chunk):
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                mask[r, width - len(ids):] = 1
            # Seeded from the chunk's first prompt: reproducible for the same batching.
            torch.manual_seed(prompt_seed(sampling.seed, prompts[start]))
            with torch.no_grad():
                gen = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                    do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                    top_p=sampling.top_p, max_new_tokens=sampling.max_tokens, num_return_sequences=n,
                    pad_token_id=tok.pad_token_id, eos_token_id=eos)
            new = gen[:, width:].cpu()
            for r, ids in enumerate(chunk):
                comps = []
                for row in new[r * n:(r + 1) * n].tolist():
                    finish = "length"
                    if eos is not None and eos in row:
                        row = row[:row.index(eos)]
                        finish = "stop"
                    comps.append(Completion(text=tok.decode(row, skip_special_tokens=True),
                                            completion_tokens=len(row), prompt_tokens=len(ids),
                                            finish_reason=finish))
                results.append(comps)
        return results

    def close(self) -> None:
        self.model = None
