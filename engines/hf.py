"""transformers `generate` behind the engine interface: the fallback where vLLM is not available, the
`hf` distillation teacher, and evaluation during SFT."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .types import Completion, SamplingSettings, prompt_seed


def _ranks_step_together(model: nn.Module) -> bool:
    """Under FSDP2 (DTensor parameters, several ranks) every decoding step all-gathers each layer, so all
    ranks must take the same number of steps, or one that finished early would leave the others waiting."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and \
        any(isinstance(p, DTensor) for p in model.parameters())


class HFGenerateEngine:
    """transformers `generate` on a model in this process (for GRPO, the trainer's own model: it needs no
    weight sync). Prompts are left-padded into batches of `batch_size` rows; the sampled tokens'
    log-probabilities are after temperature, like vLLM's `processed_logprobs`. With a seed, each prompt's
    `n` samples are one call seeded by `prompt_seed`: reproducible across batchings and ranks."""

    name = "hf"
    fp8_block: tuple[int, int] | None = None
    fp8_scale_fmt: str | None = None

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_ids: Iterable[int], batch_size: int = 64):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.batch_size = max(1, batch_size)

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        flat = [list(p) for p in prompt_ids for _ in range(n)]
        if sampling.seed is None:
            chunks = [flat[i : i + self.batch_size] for i in range(0, len(flat), self.batch_size)]
            seeds: list[int | None] = [None] * len(chunks)
        else:  # one call per prompt, seeded by the prompt
            chunks = [flat[i * n : (i + 1) * n] for i in range(len(prompt_ids))]
            seeds = [prompt_seed(sampling.seed, p) for p in prompt_ids]
        synced = _ranks_step_together(model)
        stop = [] if sampling.ignore_eos else self.eos_token_ids + list(sampling.stop_token_ids)
        completions: list[Completion] = []
        # seeded sampling reseeds torch's generators (CPU and CUDA): the caller's own random streams,
        # the GPU's included, are restored afterwards
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=sampling.seed is not None):
            try:
                for chunk, seed in zip(chunks, seeds):
                    if seed is not None:
                        torch.manual_seed(seed)
                    width = max(len(p) for p in chunk)
                    ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for r, p in enumerate(chunk):  # left padding
                        ids[r, width - len(p) :] = torch.tensor(p)
                        mask[r, width - len(p) :] = 1
                    out = model.generate(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        do_sample=sampling.temperature > 0,
                        temperature=sampling.temperature if sampling.temperature > 0 else None,
                        top_p=sampling.top_p,
                        top_k=sampling.top_k or None,
                        max_new_tokens=sampling.max_tokens,
                        min_new_tokens=sampling.max_tokens if sampling.ignore_eos else None,
                        eos_token_id=stop or None,
                        pad_token_id=self.pad_token_id,
                        output_scores=True,
                        return_dict_in_generate=True,
                        synced_gpus=synced,
                    )
                    new = out.sequences[:, width:].cpu()
                    scores = torch.stack(out.scores, dim=1).float().log_softmax(-1).cpu()  # processed logits
                    for r in range(len(chunk)):
                        toks, lps = [], []
                        for t in range(new.shape[1]):
                            tok = int(new[r, t])
                            toks.append(tok)
                            lps.append(float(scores[r, t, tok]))
                            if tok in stop:
                                break
                        finish = "stop" if toks and toks[-1] in stop else "length"
                        completions.append(Completion(toks, lps, finish))
            finally:
                model.train(was_training)
        return [completions[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        return 0.0  # it generates with the trainer's model itself

    def close(self) -> None:
        pass


__all__ = ["HFGenerateEngine"]
