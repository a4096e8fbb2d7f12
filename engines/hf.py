"""transformers `generate` behind the engine interface: the fallback where vLLM is not available, the
`hf` distillation teacher, and evaluation during SFT."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

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


def _generation_config(model: nn.Module, sampling: SamplingSettings, stop: list[int], pad_token_id: int):
    """A GenerationConfig of `sampling` alone (plus the token ids generate needs), with every other setting at
    transformers' neutral default: a checkpoint's generation_config.json (repetition_penalty,
    no_repeat_ngram_size, suppress_tokens, its own temperature/top_k, ...) changes nothing, as it changes
    nothing in vLLM, which gets explicit SamplingParams."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    sample = sampling.temperature > 0
    return GenerationConfig(
        do_sample=sample,
        # greedy: unset (transformers warns about sampling flags without do_sample), its defaults apply to nothing
        temperature=sampling.temperature if sample else None,
        top_p=sampling.top_p if sample else None,
        top_k=sampling.top_k if sample else None,  # 0: no truncation (transformers' default when unset is 50)
        max_new_tokens=sampling.max_tokens,
        min_new_tokens=sampling.max_tokens if sampling.ignore_eos else None,
        eos_token_id=stop or None,
        pad_token_id=pad_token_id,
        bos_token_id=getattr(own, "bos_token_id", None),
        output_scores=sampling.logprobs,  # held for every step of the batch: vocab x tokens x rows floats
        return_dict_in_generate=True,
    )


@contextlib.contextmanager
def _only_this_generation_config(model: nn.Module, config) -> Iterator[None]:
    """transformers fills every setting a passed GenerationConfig leaves unset (None) from the model's own
    `generation_config` (`_prepare_generation_config`), and None is the neutral value of several (suppress_tokens,
    bad_words_ids, forced_eos_token_id, ...): while generating, the model's own is `config` itself."""
    if not hasattr(model, "generation_config"):
        yield
        return
    own = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = own


class HFGenerateEngine:
    """transformers `generate` on a model in this process (for GRPO, the trainer's own model: it needs no
    weight sync). Prompts are left-padded into batches of `batch_size` rows; the sampled tokens'
    log-probabilities are after temperature, like vLLM's `processed_logprobs`. With a seed, each prompt's
    `n` samples are one call seeded by `prompt_seed`: reproducible across batchings and ranks. Only the
    SamplingSettings decide the sampling: the checkpoint's generation_config.json is not applied, as vLLM
    does not apply it to explicit SamplingParams (`_generation_config`)."""

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
        config = _generation_config(model, sampling, stop, self.pad_token_id)
        completions: list[Completion] = []
        # seeded sampling reseeds torch's generators (CPU and CUDA): the caller's own random streams,
        # the GPU's included, are restored afterwards
        rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices, enabled=sampling.seed is not None), \
                _only_this_generation_config(model, config):
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
                        generation_config=config,
                        synced_gpus=synced,
                    )
                    new = out.sequences[:, width:].cpu()
                    scores = None
                    if sampling.logprobs:
                        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1).cpu()  # processed logits
                    for r in range(len(chunk)):
                        toks, lps = [], []
                        for t in range(new.shape[1]):
                            tok = int(new[r, t])
                            toks.append(tok)
                            if scores is not None:
                                lps.append(float(scores[r, t, tok]))
                            if tok in stop:
                                break
                        finish = "stop" if toks and toks[-1] in stop else "length"
                        completions.append(Completion(toks, lps if scores is not None else None, finish))
            finally:
                model.train(was_training)
        return [completions[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        return 0.0  # it generates with the trainer's model itself

    def close(self) -> None:
        pass


__all__ = ["HFGenerateEngine"]
