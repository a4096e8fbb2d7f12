"""How often a checkpoint's MTP module drafts the token its own model then samples, measured on the
evaluation's answers (`mtp_acceptance: true` in the eval stage).

DeepSeek-V3 (§2.2, §5.4.3) repurposes the MTP module for speculative decoding: after the model samples
token t+1, the module drafts token t+2 from the main model's hidden state at t and the embedding of t+1;
the model keeps the draft when its own sample agrees. With one draft token, that is the chance that the
module's top-1 guess equals the sampled token (rejection sampling accepts a one-hot draft x with
probability p(x), the chance of sampling x), so the fraction of answer tokens the module guessed is the
acceptance a speculative decoder measures, up to sampling noise. Every answer token after the first
is a draft target: the first is sampled from the prompt before any draft.

Measured on each stage's own answers to the same problems with the same per-prompt seeds, the stages
are compared pairwise, where the GRPO log's `mtp/accept_rate` compares different prompts at the start
and the end of training."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def drafter_hits(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]],
                 batch_size: int = 64) -> list[tuple[int, int]]:
    """(drafts that equal the sampled token, drafts) per problem, over all its answers. `model` is a
    `DeepseekV3ForCausalLMWithMTP`; `completions[i]` are the answers to `prompts[i]` (token ids, as
    sampled, the stop token included)."""
    counts = [[0, 0] for _ in prompts]
    rows = [(i, list(prompts[i]), list(c)) for i in range(len(prompts)) for c in completions[i] if len(c) >= 2]
    rows.sort(key=lambda r: len(r[1]) + len(r[2]))  # similar lengths share a batch
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            width = max(len(p) + len(c) for _, p, c in part)
            # right padding: the model and its MTP module are causal, so no real position sees a pad
            ids = torch.zeros(len(part), width, dtype=torch.long)
            for r, (_, p, c) in enumerate(part):
                ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            ids = ids.to(device)
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            drafts = model._mtp(hidden, ids, None, None, None, detach_input=True)[0][0].argmax(-1)  # at j: token j+2
            for r, (i, p, c) in enumerate(part):
                first, end = len(p) + 1, len(p) + len(c)  # targets: the answer's tokens after its first
                hits = (drafts[r, first - 2:end - 2] == ids[r, first:end]).sum().item()
                counts[i][0] += int(hits)
                counts[i][1] += end - first
    return [(h, n) for h, n in counts]


__all__ = ["drafter_hits"]
