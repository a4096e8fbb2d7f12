"""Read a DeepSeek-layout FP8 checkpoint into high precision, and write it back as FP8.

Round-trip guarantee: a checkpoint loaded and saved with no change to a weight is
byte-identical in its tensors. Re-quantizing a dequantized block cannot promise that
(``q * s`` is rounded in fp32/bf16, and DeepSeek's released scales are not always
``amax / 448``), so on save every FP8 weight is first compared with the dequantized
original (read again, tensor by tensor, from the source shards, or kept in memory with
``keep_originals=True``); if it is bit-equal the original fp8 bits and scale are written,
otherwise the weight is re-quantized with per-block amax scaling (``quant.quantize_blockwise``).

Names are DeepSeek's (``...kv_a_proj_with_mqa.weight`` + ``..._scale_inv``, per-expert
``mlp.experts.{i}.*``); mapping to transformers' fused expert tensors is the model
loader's job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .layout import (
    ShardedLayout,
    block_size_from_config,
    copy_side_files,
    is_fp8_weight_name,
    is_scale_name,
    read_config,
    read_layout,
    scale_fmt_from_config,
    scale_name_for,
    write_config,
    write_index,
)
from .quant import FP8_DTYPE, dequantize_blockwise, quantize_blockwise

__all__ = ["FP8CheckpointMeta", "load_fp8_checkpoint", "save_fp8_checkpoint"]


@dataclass
class FP8CheckpointMeta:
    """What :func:`save_fp8_checkpoint` needs to write a checkpoint back in its original form."""

    source_dir: Path | None
    config: dict
    layout: ShardedLayout
    dtypes: dict[str, torch.dtype]  # stored dtype of every tensor, scales included
    fp8_weights: dict[str, str]  # fp8 weight name -> its scale tensor name
    shard_metadata: dict[str, dict[str, str] | None]
    block: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None
    originals: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def is_fp8(self) -> bool:
        return bool(self.fp8_weights) or "quantization_config" in self.config


class _ShardReader:
    """Open-on-demand safetensors handles for one checkpoint directory (mmap, tensor by tensor)."""

    def __init__(self, ckpt_dir: Path, weight_map: Mapping[str, str]):
        self.dir = ckpt_dir
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    def handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        return self.handle(self.weight_map[name]).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def load_fp8_checkpoint(
    ckpt_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    upcast_others: bool = False,
    keep_originals: bool = False,
) -> tuple[dict[str, torch.Tensor], FP8CheckpointMeta]:
    """Load a DeepSeek-layout checkpoint (FP8 or not) into a high-precision state dict.

    FP8 weights are dequantized to ``dtype`` (128x128 blocks, ceil-divided) and their
    ``*_scale_inv`` tensors are consumed (not in the returned dict). Other tensors keep
    their stored dtype, or with ``upcast_others=True`` are widened to ``dtype`` when that
    is wider (never narrowed, so saving casts back exactly).

    ``keep_originals=True`` holds the original fp8 bits and scales in memory (1 byte per
    FP8 parameter) instead of re-reading them from ``ckpt_dir`` at save time; use it when
    the source directory may change or disappear before saving.
    """
    src = Path(ckpt_dir)
    config = read_config(src)
    layout = read_layout(src)
    block = block_size_from_config(config)
    reader = _ShardReader(src, layout.weight_map)
    state: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    fp8_weights: dict[str, str] = {}
    shard_metadata: dict[str, dict[str, str] | None] = {}
    originals: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if keep_originals else None
    keys_by_shard = layout.by_shard()
    try:
        for shard in layout.shards():
            handle = reader.handle(shard)
            shard_metadata[shard] = handle.metadata()
            for name in keys_by_shard[shard]:
                t = handle.get_tensor(name)
                dtypes[name] = t.dtype
                if is_scale_name(name):
                    continue
                if t.dtype == FP8_DTYPE:
                    scale_name = scale_name_for(name)
                    if scale_name not in layout.weight_map:
                        raise ValueError(f"fp8 tensor {name} has no {scale_name} in the checkpoint")
                    scale = reader.get(scale_name)
                    fp8_weights[name] = scale_name
                    state[name] = dequantize_blockwise(t, scale, block, dtype)
                    if originals is not None:
                        originals[name] = (t, scale)
                elif upcast_others and t.is_floating_point() and t.itemsize < dtype.itemsize:
                    state[name] = t.to(dtype)
                else:
                    state[name] = t
    finally:
        reader.close()
    meta = FP8CheckpointMeta(
        source_dir=src,
        config=config,
        layout=layout,
        dtypes=dtypes,
        fp8_weights=fp8_weights,
        shard_metadata=shard_metadata,
        block=block,
        scale_fmt=scale_fmt_from_config(config),
        originals=originals,
    )
    return state, meta


def _quantize_for_save(
    name: str,
    master: torch.Tensor,
    meta: FP8CheckpointMeta,
    reader: _ShardReader | None,
    requantize: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8, scale) to write for one FP8 weight: the original pair if ``master`` is unchanged."""
    master = master.detach().to("cpu")
    scale_dtype = meta.dtypes.get(meta.fp8_weights.get(name, ""), torch.float32)
    if requantize == "changed":
        orig = None
        if meta.originals is not None and name in meta.originals:
            orig = meta.originals[name]
        elif reader is not None and name in meta.fp8_weights:
            orig = (reader.get(name), reader.get(meta.fp8_weights[name]))
        if orig is not None and orig[0].shape == master.shape:
            if torch.equal(dequantize_blockwise(orig[0], orig[1], meta.block, master.dtype), master):
                return orig
    q, s = quantize_blockwise(master, meta.block, meta.scale_fmt)
    return q, s.to(scale_dtype)


def save_fp8_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    meta: FP8CheckpointMeta,
    dst_dir: str | os.PathLike,
    *,
    requantize: str = "changed",
    strict: bool = True,
    side_files: bool = True,
) -> None:
    """Write ``state_dict`` in the layout described by ``meta`` (same shards, names, dtypes).

    * FP8 weights: original fp8 bits + scale when unchanged (``requantize="changed"``),
      else re-quantized per 128x128 block (``quantization_config.scale_fmt`` honoured);
      ``requantize="all"`` always re-quantizes.
    * Everything else is cast back to its stored dtype.
    * Tensors not in ``meta`` go to the last shard (FP8 if their name is an FP8 Linear and
      the checkpoint is FP8). With ``strict`` a tensor of ``meta`` missing from
      ``state_dict`` is an error; otherwise it is dropped.
    * Shards are written under temporary names and renamed at the end, so ``dst_dir`` may
      be the source directory. Index (``total_size`` recomputed), ``config.json`` (with
      its ``quantization_config``) and, with ``side_files``, the source's other top-level
      files (tokenizer ...) are written alongside.
    """
    if requantize not in ("changed", "all"):
        raise ValueError("requantize must be 'changed' or 'all'")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    layout = meta.layout
    scale_owner = {s: w for w, s in meta.fp8_weights.items()}
    missing = [
        k for k in layout.weight_map if k not in state_dict and not (k in scale_owner and scale_owner[k] in state_dict)
    ]
    if missing and strict:
        raise KeyError(f"{len(missing)} tensors of the checkpoint are missing from the state dict, e.g. {missing[:5]}")

    # Assign every output tensor to a shard: the original layout plus new tensors in the last shard.
    weight_map = {k: f for k, f in layout.weight_map.items() if k not in missing}
    shards = layout.shards()
    new_fp8: dict[str, str] = {}
    for k in state_dict:
        if k in weight_map:
            continue
        weight_map[k] = shards[-1]
        if meta.is_fp8 and is_fp8_weight_name(k) and state_dict[k].dim() == 2:
            new_fp8[k] = scale_name_for(k)
            weight_map[new_fp8[k]] = shards[-1]
    fp8_pairs = {**{w: s for w, s in meta.fp8_weights.items() if w in state_dict}, **new_fp8}
    owner = {s: w for w, s in fp8_pairs.items()}

    reader = _ShardReader(meta.source_dir, layout.weight_map) if meta.source_dir is not None else None
    # (fp8, scale) pairs kept only until both halves are written (they may sit in different shards)
    pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    written: dict[str, int] = {}
    total_size = 0
    tmp_paths: list[tuple[Path, Path]] = []
    by_shard: dict[str, list[str]] = {sh: [] for sh in shards}
    for k, f in weight_map.items():
        by_shard[f].append(k)
    try:
        for shard in shards:
            out: dict[str, torch.Tensor] = {}
            for name in by_shard[shard]:
                w_name = owner.get(name, name)
                if w_name in fp8_pairs:
                    if w_name not in pending:
                        pending[w_name] = _quantize_for_save(w_name, state_dict[w_name], meta, reader, requantize)
                    q, s = pending[w_name]
                    t = s if name in owner else q
                    written[w_name] = written.get(w_name, 0) + 1
                    if written[w_name] == 2:
                        del pending[w_name]
                else:
                    t = state_dict[name].detach().to("cpu")
                    if name in meta.dtypes:
                        t = t.to(meta.dtypes[name])
                out[name] = t.contiguous()
                total_size += t.numel() * t.element_size()
            final = dst / shard
            tmp = dst / f".{shard}.tmp"
            save_file(out, str(tmp), metadata=meta.shard_metadata.get(shard) or {"format": "pt"})
            tmp_paths.append((tmp, final))
            del out
    finally:
        if reader is not None:
            reader.close()
    for tmp, final in tmp_paths:
        os.replace(tmp, final)
    if layout.indexed:
        write_index(dst, weight_map, total_size, layout.metadata)
    if side_files and meta.source_dir is not None:
        copy_side_files(meta.source_dir, dst)
    write_config(dst, meta.config)
