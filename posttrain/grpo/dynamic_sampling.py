"""Dynamic sampling (DAPO, Yu et al. 2025, §3.2): train only on groups whose rewards differ.

A group of G completions whose rewards all tie (all right, all wrong) has zero group-normalised
advantage: it adds nothing to the policy gradient and, in the per-sequence or per-token mean of the
loss, only shrinks everyone else's share. DAPO drops such groups and keeps sampling prompts until
the batch is full of groups with spread. Here, in `V3GRPOTrainer._generate_and_score_completions`:

1. TRL's batch (its RepeatSampler's prompts) is generated and scored as usual (round 1);
2. groups without spread are dropped (`groups_with_spread` on the rewards TRL computed);
3. while a rank has fewer groups than its batch holds, another engine call samples more prompts,
   drawn from the training set by `extra_prompt_indices` — a pure function of (seed, step, round),
   so a resumed run draws the same; one draw for all ranks, dealt out by `split_draw`, none of it a
   prompt of this step's batch on any rank — and seeded by round (see `round_seed`); at most
   `max_sampling_rounds` rounds in all, fewer when the dataset has no unsampled prompt left;
4. the first groups with spread fill the batch, in round order. If the rounds run out first, the
   batch is trained on the groups with spread it has (smaller), or, when there are none at all, on
   round 1's batch unchanged (zero advantages: no policy gradient, only the MTP and balancing terms).

This module holds the pure parts (group filter, top-up bookkeeping, batch selection and
concatenation), unit-tested on synthetic rewards in tests/test_dynamic_sampling.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

# Keys of TRL's `_generate_and_score_completions` output that are left-padded (the prompt side);
# every other per-token tensor is right-padded.
_LEFT_PADDED = ("prompt_ids", "prompt_mask")


def groups_with_spread(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor | None,
    group_size: int,
    aggregation: str = "sum_then_normalize",
    atol: float = 1e-6,
) -> torch.Tensor:
    """[num_groups] bool: does the group's reward differ between its completions?

    `rewards_per_func` is TRL's [rows, num_funcs] (NaN: not scored), rows in groups of
    `group_size` consecutive completions. With TRL's default `sum_then_normalize` the advantage is
    computed from the weighted sum, so that sum must differ; with `normalize_then_sum` each function
    is normalised within the group first, so one function that differs is enough. NaN rewards are
    ignored; a group with fewer than two scored completions has no spread."""
    if rewards_per_func.dim() == 1:
        rewards_per_func = rewards_per_func[:, None]
    rows, funcs = rewards_per_func.shape
    if rows % group_size:
        raise ValueError(f"{rows} rewards do not split into groups of {group_size}")
    r = rewards_per_func.float()
    if aggregation == "sum_then_normalize":
        w = torch.ones(funcs, device=r.device) if weights is None else weights.float().to(r.device)
        unscored = torch.isnan(r).all(dim=1)
        r = (torch.nan_to_num(r, nan=0.0) * w).sum(dim=1, keepdim=True)
        r[unscored] = float("nan")
    elif aggregation != "normalize_then_sum":
        raise ValueError(f"unknown multi_objective_aggregation {aggregation!r}")
    g = r.view(-1, group_size, r.shape[1])
    scored = ~torch.isnan(g)
    hi = torch.where(scored, g, torch.full_like(g, -math.inf)).amax(dim=1)
    lo = torch.where(scored, g, torch.full_like(g, math.inf)).amin(dim=1)
    spread = (scored.sum(dim=1) >= 2) & ((hi - lo) > atol)
    return spread.any(dim=1)


@dataclass
class TopUp:
    """Per-step bookkeeping of dynamic sampling across ranks.

    Every rank holds `target` groups of the batch. Each round, every rank samples the same number of
    groups; `add_round` takes the gathered spread mask (ranks in order, as TRL gathers rewards) and
    returns this rank's groups to keep. Every rank computes the same counts, so all of them take the
    same number of rounds (the engine calls and TRL's gathers stay in step)."""

    target: int
    world: int = 1
    rank: int = 0
    kept: list[int] = field(default_factory=list)
    sampled: int = 0  # groups sampled, all ranks
    with_spread: int = 0  # of which had spread, all ranks
    dropped: int = 0  # groups dropped for tied rewards, all ranks
    rounds: int = 0

    def __post_init__(self):
        if not self.kept:
            self.kept = [0] * self.world

    def add_round(self, spread: torch.Tensor) -> list[int]:
        """This rank's local group indices to keep from the round whose gathered mask is `spread`."""
        per_rank = spread.view(self.world, -1).cpu()
        self.rounds += 1
        self.sampled += per_rank.numel()
        self.with_spread += int(per_rank.sum())
        self.dropped += int((~per_rank).sum())
        mine: list[int] = []
        for r in range(self.world):
            take = [int(i) for i in per_rank[r].nonzero().flatten()][: max(self.target - self.kept[r], 0)]
            self.kept[r] += len(take)
            if r == self.rank:
                mine = take
        return mine

    @property
    def full(self) -> bool:
        return min(self.kept) >= self.target

    def next_draw(self) -> int:
        """Groups per rank for the next round: the largest shortfall over the spread rate seen so far
        this step (at least the shortfall, at most a whole batch)."""
        need = self.target - min(self.kept)
        if need <= 0:
            return 0
        rate = self.with_spread / self.sampled if self.sampled else 0.0
        n = math.ceil(need / rate) if rate > 0 else self.target
        return max(need, min(n, self.target))


def round_seed(step_seed: int | None, round_index: int) -> int | None:
    """The sampling seed of round `round_index` (0 = TRL's own batch, which keeps the step's seed):
    a prompt drawn again in a later round gets fresh samples, reproducibly."""
    if step_seed is None or round_index == 0:
        return step_seed
    return step_seed + round_index * 1_000_000_007


def extra_prompt_indices(n: int, dataset_size: int, seed: int | None, step: int, round_index: int,
                         skip=lambda i: False) -> list[int]:
    """`n` distinct dataset indices for an extra round, none for which `skip(i)` holds (e.g. prompts
    already in this step's batch): a pure function of its arguments, so a rerun and a resumed run
    draw the same. Fewer when the dataset runs out."""
    rng = random.Random(f"dynamic-sampling|{seed}|{step}|{round_index}")
    out: list[int] = []
    # a random order of the whole dataset, walked lazily: no O(dataset) work for a small draw
    for i in rng.sample(range(dataset_size), dataset_size) if dataset_size <= 4 * n + 64 else _lazy_order(rng, dataset_size):
        if not skip(i):
            out.append(i)
            if len(out) == n:
                break
    return out


def split_draw(indices: list[int], world: int) -> list[list[int]]:
    """One draw for all ranks (`extra_prompt_indices` of every rank's need together), dealt out in equal
    slices, rank order: no two ranks sample the same prompt in a round (they would sample it with the same
    seed, i.e. the same completions), and every rank gets as many prompts as the others, as TRL's
    gathers need. What does not split evenly is left out; all slices are empty when fewer than `world`
    prompts are left."""
    per_rank = len(indices) // world
    return [indices[r * per_rank:(r + 1) * per_rank] for r in range(world)]


def _lazy_order(rng: random.Random, size: int):
    seen: set[int] = set()
    while len(seen) < size:
        i = rng.randrange(size)
        if i not in seen:
            seen.add(i)
            yield i


def select_rows(batch: dict[str, Any], rows: list[int], num_rows: int) -> dict[str, Any]:
    """The rows `rows` of a TRL generation batch (tensors and lists whose first dimension is the
    batch); everything else (e.g. `num_items_in_batch`) is left for the caller to recompute."""
    index = torch.tensor(rows, dtype=torch.long)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == num_rows:
            out[k] = v[index.to(v.device)]
        elif isinstance(v, list) and len(v) == num_rows:
            out[k] = [v[i] for i in rows]
        else:
            out[k] = v
    return out


def group_rows(groups: list[int], group_size: int) -> list[int]:
    return [g * group_size + j for g in groups for j in range(group_size)]


def concat_batches(batches: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Concatenate generation batches along rows, re-padding per-token tensors to the widest:
    prompts on the left (TRL left-pads them), completions and their per-token companions on the
    right, with the pad token for ids and 0 for masks, log-probs and ratios (masked out anyway)."""
    if len(batches) == 1:
        return dict(batches[0])
    out: dict[str, Any] = {}
    for k, first in batches[0].items():
        vals = [b[k] for b in batches]
        if isinstance(first, torch.Tensor) and first.dim() >= 2:
            width = max(v.shape[1] for v in vals)
            fill = pad_token_id if k in ("prompt_ids", "completion_ids") else 0
            padded = []
            for v in vals:
                extra = width - v.shape[1]
                if extra:
                    pad = torch.full((v.shape[0], extra, *v.shape[2:]), fill, dtype=v.dtype, device=v.device)
                    v = torch.cat([pad, v] if k in _LEFT_PADDED else [v, pad], dim=1)
                padded.append(v)
            out[k] = torch.cat(padded, dim=0)
        elif isinstance(first, torch.Tensor) and first.dim() == 1:
            out[k] = torch.cat(vals, dim=0)
        elif isinstance(first, list):
            out[k] = [x for v in vals for x in v]
        else:
            out[k] = first
    return out


__all__ = ["TopUp", "concat_batches", "extra_prompt_indices", "group_rows", "groups_with_spread", "round_seed",
           "select_rows", "split_draw"]
