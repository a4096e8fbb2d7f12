"""Sample-masked packing: best-fit-decreasing bins of `max_length` tokens, and the collator that
isolates the samples of a row.

The bins come from TRL's `pack_dataset(..., strategy="bfd")` (TRL 1.16), which keeps samples whole and
records each row's `seq_lengths`. Isolation is then a matter of what the collator gives the model:
per-sample `position_ids` that restart at 0 and *no* `attention_mask` — transformers (5.19) derives
a block-diagonal causal mask from the position restarts (sdpa/eager) or feeds flash-attention's
varlen kernel from them, while an attention mask (even all ones) makes it fall back to plain causal
attention across samples. (`use_cache=False` is the trainer's part: with a cache the packed-sequence
detection is skipped too.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import IGNORE_INDEX

# BFD runs over groups of this many samples (one group for small datasets): bins are near-optimal
# within a group while memory stays bounded for millions of samples.
PACKING_GROUP_SIZE = 20_000


def pack_samples(ds, max_length: int, num_proc: int | None = None):
    """`input_ids`/`labels` samples (each ≤ max_length) → rows of ≤ max_length tokens with `seq_lengths`."""
    from trl import pack_dataset

    map_kwargs: dict[str, Any] = {"batch_size": PACKING_GROUP_SIZE}
    if num_proc:
        map_kwargs["num_proc"] = num_proc
    return pack_dataset(ds.select_columns(["input_ids", "labels"]), max_length, "bfd", map_kwargs)


def position_ids_for(seq_lengths: list[int]) -> list[int]:
    return [p for n in seq_lengths for p in range(n)]


@dataclass
class PackedCollator:
    """Batches packed rows (or single samples) without an attention mask.

    Each example has `input_ids`, `labels` and optionally `seq_lengths` (the packed samples' lengths;
    one sample when absent). Output: `input_ids`, `labels`, `position_ids` (restarting at 0 per sample)
    and, for the trainer only, `token_mask` (real tokens) and `num_tokens` (their count, an int).

    * `padding_free=True` (with a kernel that reads samples from position_ids: flash-attention varlen
      on GPU, `sdpa_segmented` on CPU): all rows are flattened into one [1, total] row — no pad token
      at all — with `cu_seq_lens_q/k` and `max_length_q/k` precomputed as TRL does.
    * `padding_free=False` (sdpa/eager): rows stay rows, [batch, longest row], so that masked
      attention costs rows × L² rather than (rows × L)²; the tail of a shorter row is a pad
      *segment* with its own positions 0..p-1, never a target and excluded from expert counts, so
      it attends only to itself.
    """

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = []
        for ex in examples:
            ids = list(ex["input_ids"])
            labels = list(ex["labels"])
            lengths = list(ex.get("seq_lengths") or [len(ids)])
            if sum(lengths) != len(ids):
                raise ValueError(f"seq_lengths {lengths} do not add up to the row length {len(ids)}")
            labels = _mask_sample_starts(labels, lengths)
            rows.append((ids, labels, lengths))
        if self.padding_free:
            return self._flat(rows)
        return self._rows(rows)

    def _target_len(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else ((n + m - 1) // m) * m

    def _rows(self, rows) -> dict[str, Any]:
        width = self._target_len(max(len(ids) for ids, _, _ in rows))
        b = len(rows)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((b, width), dtype=torch.long)
        token_mask = torch.zeros((b, width), dtype=torch.bool)
        n_real = 0
        for r, (ids, lab, lengths) in enumerate(rows):
            n = len(ids)
            input_ids[r, :n] = torch.tensor(ids)
            labels[r, :n] = torch.tensor(lab)
            position_ids[r, :n] = torch.tensor(position_ids_for(lengths))
            position_ids[r, n:] = torch.arange(width - n)  # the pad segment restarts at 0: its own sample
            token_mask[r, :n] = True
            n_real += n
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "token_mask": token_mask,
            "num_tokens": n_real,
        }

    def _flat(self, rows) -> dict[str, Any]:
        ids = [t for r in rows for t in r[0]]
        lab = [t for r in rows for t in r[1]]
        lengths = [n for r in rows for n in r[2]]
        n = len(ids)
        width = self._target_len(n)
        if width > n:  # a trailing pad segment
            ids += [self.pad_token_id] * (width - n)
            lab += [IGNORE_INDEX] * (width - n)
            lengths = lengths + [width - n]
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        token_mask = torch.zeros((1, width), dtype=torch.bool)
        token_mask[0, :n] = True
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([lab]),
            "position_ids": torch.tensor([position_ids_for(lengths)]),
            "token_mask": token_mask,
            "num_tokens": n,
            # flash-attention varlen boundaries, computed here on CPU (no device sync per layer)
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
        }


def _mask_sample_starts(labels: list[int], lengths: list[int]) -> list[int]:
    """The first token of every packed sample is never a target (its predecessor is another sample)."""
    out = list(labels)
    start = 0
    for n in lengths:
        if n:
            out[start] = IGNORE_INDEX
        start += n
    return out
