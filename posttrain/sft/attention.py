"""Attention for packed SFT rows: the kernel choice per device, and segment-wise SDPA for CPU.

Packed rows (many samples per row, positions restarting at 0 per sample) need attention that keeps
the samples apart without paying for an [L, L] mask:

* CUDA default: transformers' own `flex_attention`. With no `attention_mask`, no cache and
  restarting `position_ids`, `masking_utils.create_causal_mask` (transformers 5.19) finds the
  samples (`find_packed_sequence_indices`: a new sample wherever positions do not continue by +1)
  and ands a document mask into the causal one; for flex that becomes a `BlockMask`, so only the
  blocks on the diagonal of each sample are computed. The MTP block (posttrain/modeling.py `_mtp`)
  builds its mask with the same `create_causal_mask` call and gets the same treatment. Measured on
  one H100 (8k-token packed row, 16 heads, d 192, fwd+bwd): flex 3.06 ms, per-segment SDPA 3.13 ms,
  dense-mask SDPA 17.9 ms. flex compiles on its first call (13.5 s there); torch.compile's automatic
  dynamic shapes recompile once more at the second row width and then cover all widths (the step
  benchmark, benchmarks/bench_gpu_sft.py, varies the width to check it), where cuDNN SDPA builds a
  plan of 3-5 s at every new row width.
* CPU default: `sdpa_segmented` below. flex has no CPU backward (torch 2.13: "FlexAttention does
  not support backward on CPU"); its CPU forward works (compiled C++).

Segment-wise SDPA: transformers turns per-sample `position_ids` into a block-diagonal causal mask and runs SDPA over the
whole row: with ~5 samples in a 512-token row, ~80% of that attention is computed and then masked
away, and a mask also sends CPU SDPA to its slow "math" path. flash-attention's varlen kernel avoids
both on GPU; this is the CPU counterpart: each packed sample's attention runs as its own causal SDPA
call (no mask tensor), so the cost is Σ n_i² instead of L², and the results are those of the mask.

It is registered with transformers' public `AttentionInterface` / `AttentionMaskInterface` under
`SEGMENTED_SDPA` and used when `attn_implementation` is left unset on CPU. Whenever the caller gives
a padding mask, a cache offset applies, or there are no position ids, it is plain `sdpa`. Unlike
`sdpa`/`eager`, it keeps packed samples apart even under the two traps (an all-ones attention mask,
`use_cache=True`), since the samples are read from the position ids in every case.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..modeling import autocast_attention_inputs

SEGMENTED_SDPA = "sdpa_segmented"
FLEX_ATTENTION = "flex_attention"
FLEX_CPU_ERROR = (
    "attn_implementation 'flex_attention' cannot train on CPU (torch has no FlexAttention backward there); "
    "use 'sdpa_segmented' (the CPU default: leave attn_implementation unset), 'sdpa' or 'eager'"
)
# Kernels that find the packed samples from position_ids alone, so one flattened row per batch
# (padding_free) costs Σ n_i² rather than (batch tokens)².
_POSITION_AWARE = (SEGMENTED_SDPA, FLEX_ATTENTION, "flash_attention_2", "flash_attention_3", "flash_attention_4")


def default_attn_implementation(device_type: str) -> str:
    """The packed-row kernel for a device type ('cuda', 'cpu', ...): flex on CUDA, segmented SDPA elsewhere."""
    return FLEX_ATTENTION if device_type == "cuda" else SEGMENTED_SDPA


def reads_samples_from_positions(attn_implementation: str | None) -> bool:
    """Whether the kernel keeps packed samples apart on one flat row without a dense mask."""
    return (attn_implementation or "") in _POSITION_AWARE


# Every layer gets the same `position_ids` tensor: its bounds are read on the host once per forward, not
# once per layer (on CUDA each read waits for the GPU). The last tensor is remembered by a weak reference
# (identity, not equality: == on tensors is elementwise) and its in-place version counter.
_last_bounds: list = [None, -1, None]  # [weakref to position_ids, its _version, bounds]


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) of each sample: a sample starts where positions do not continue (+1),
    the rule transformers' `find_packed_sequence_indices` uses."""
    ref, version, bounds = _last_bounds
    if ref is not None and ref() is position_ids and version == position_ids._version:
        return bounds
    bounds = _segment_bounds(position_ids)
    _last_bounds[:] = [weakref.ref(position_ids), position_ids._version, bounds]
    return bounds


def _segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    pos = position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    length = pos.shape[1]
    out = []
    for row in starts.tolist():
        idx = [i for i, s in enumerate(row) if s]
        out.append(list(zip(idx, idx[1:] + [length])))
    return out


# torch.compile (`torch_compile: true`, regional compilation) runs it eagerly, a graph break per layer:
# the per-sample split lengths are read on the host (through the per-forward cache above), and traced
# they went stale or symbolic, so a later row was split by sizes that do not add up to its width (torch
# 2.13: "RuntimeError when making fake tensor call"). Compilation would not fuse its SDPA calls anyway.
@torch.compiler.disable
def segmented_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
):
    """`AttentionInterface` function: query/key/value [batch, heads, seq, dim] → ([batch, seq, heads, dim], None).
    Under autocast q, k, v are cast to its dtype first (MLA hands over an fp32 query with bf16 keys)."""
    query, key, value = autocast_attention_inputs(query, key, value)
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    bounds = segment_bounds(position_ids)
    if len(bounds) != query.shape[0]:  # one row of positions for the whole batch
        bounds = bounds * query.shape[0]
    p = dropout if module.training else 0.0
    rows = []
    # unbind/split rather than slicing: their backward is one stack/cat, where each slice's backward
    # would allocate and add a full-size zero gradient.
    for q, k, v, segments in zip(query.unbind(0), key.unbind(0), value.unbind(0), bounds):
        lengths = [e - s for s, e in segments]
        parts = [
            F.scaled_dot_product_attention(qs, ks, vs, dropout_p=p, is_causal=True, scale=scaling)
            for qs, ks, vs in zip(q.split(lengths, dim=1), k.split(lengths, dim=1), v.split(lengths, dim=1))
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    out = torch.stack(rows, dim=0)  # [batch, heads, seq, dim]
    return out.transpose(1, 2).contiguous(), None


def _segmented_mask(*args, **kwargs):
    # A fresh forward without padding needs no mask tensor: the attention reads position_ids. With a
    # cache offset or a padding mask, build SDPA's mask and the attention falls back to SDPA.
    fresh = kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("q_offset") and not kwargs.get("kv_offset")
    if fresh and kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register_segmented_sdpa() -> str:
    """Registers the implementation (idempotent) and returns its `attn_implementation` name."""
    AttentionInterface.register(SEGMENTED_SDPA, segmented_sdpa_forward)
    AttentionMaskInterface.register(SEGMENTED_SDPA, _segmented_mask)
    return SEGMENTED_SDPA
