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
from .quant import FP8_DTYPE, dequantize_blockwise, quantize_blockwise, scale_from_float32

__all__ = ["FP8CheckpointMeta", "LazyCheckpointTensor", "load_fp8_checkpoint", "open_fp8_checkpoint",
           "save_fp8_checkpoint"]


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


# scale dtypes that store only powers of two (UE8M0)
_POW2_SCALE_DTYPES = {torch.uint8, *([torch.float8_e8m0fnu] if hasattr(torch, "float8_e8m0fnu") else [])}

# safetensors header dtype names -> torch dtypes (read without loading a tensor)
_SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool, "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
}


class LazyCheckpointTensor:
    """One tensor of a checkpoint, read -- and for an FP8 weight dequantized -- only when indexed.

    ``t[...]`` materializes it, the way transformers' loader materializes the lazy safetensors
    slices it builds itself, so ``from_pretrained(state_dict={name: LazyCheckpointTensor})``
    need not hold a dequantized copy of the whole model next to the model itself.
    """

    __slots__ = ("_reader", "name", "scale_name", "block", "dtype", "upcast")

    def __init__(self, reader: _ShardReader, name: str, scale_name: str | None, block: tuple[int, int],
                 dtype: torch.dtype, upcast: bool = False):
        self._reader, self.name, self.scale_name = reader, name, scale_name
        self.block, self.dtype, self.upcast = block, dtype, upcast

    def materialize(self) -> torch.Tensor:
        t = self._reader.get(self.name)
        if self.scale_name is not None:
            return dequantize_blockwise(t, self._reader.get(self.scale_name), self.block, self.dtype)
        if self.upcast and t.is_floating_point() and t.itemsize < self.dtype.itemsize:
            return t.to(self.dtype)
        return t

    def __getitem__(self, index) -> torch.Tensor:
        t = self.materialize()
        return t if index is Ellipsis else t[index]

    def __repr__(self) -> str:
        return f"LazyCheckpointTensor({self.name!r}, fp8={self.scale_name is not None})"


def open_fp8_checkpoint(
    ckpt_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    upcast_others: bool = False,
) -> tuple[dict[str, LazyCheckpointTensor], FP8CheckpointMeta]:
    """A DeepSeek-layout checkpoint (FP8 or not) as lazy high-precision tensors, plus its metadata.

    Reads only the shard headers. Each returned :class:`LazyCheckpointTensor` reads its tensor when
    indexed: FP8 weights dequantized to ``dtype`` (128x128 blocks, ceil-divided; their
    ``*_scale_inv`` tensors are consumed, not returned), other tensors in their stored dtype, or
    with ``upcast_others=True`` widened to ``dtype`` when that is wider (never narrowed, so saving
    casts back exactly). The shard handles stay open (mmap) while any returned tensor is alive.
    """
    src = Path(ckpt_dir)
    config = read_config(src)
    layout = read_layout(src)
    block = block_size_from_config(config)
    reader = _ShardReader(src, layout.weight_map)
    lazy: dict[str, LazyCheckpointTensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    fp8_weights: dict[str, str] = {}
    shard_metadata: dict[str, dict[str, str] | None] = {}
    keys_by_shard = layout.by_shard()
    for shard in layout.shards():
        handle = reader.handle(shard)  # opened here, once: the lazy tensors may be read from several threads
        shard_metadata[shard] = handle.metadata()
        for name in keys_by_shard[shard]:
            stored = handle.get_slice(name).get_dtype()
            # a dtype missing from the table: read that one tensor to learn it
            dtypes[name] = _SAFETENSORS_DTYPES.get(stored) or handle.get_tensor(name).dtype
    for name, stored in dtypes.items():
        if is_scale_name(name):
            continue
        scale_name = None
        if stored == FP8_DTYPE:
            scale_name = scale_name_for(name)
            if scale_name not in layout.weight_map:
                raise ValueError(f"{src}: fp8 tensor {name} has no {scale_name} in the checkpoint")
            fp8_weights[name] = scale_name
        lazy[name] = LazyCheckpointTensor(reader, name, scale_name, block, dtype, upcast=upcast_others)
    meta = FP8CheckpointMeta(
        source_dir=src,
        config=config,
        layout=layout,
        dtypes=dtypes,
        fp8_weights=fp8_weights,
        shard_metadata=shard_metadata,
        block=block,
        scale_fmt=scale_fmt_from_config(config),
    )
    return lazy, meta


def load_fp8_checkpoint(
    ckpt_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    upcast_others: bool = False,
    keep_originals: bool = False,
) -> tuple[dict[str, torch.Tensor], FP8CheckpointMeta]:
    """Load a DeepSeek-layout checkpoint (FP8 or not) into a high-precision state dict.

    :func:`open_fp8_checkpoint`, every tensor materialized. ``keep_originals=True`` holds the
    original fp8 bits and scales in memory (1 byte per FP8 parameter) instead of re-reading them
    from ``ckpt_dir`` at save time; use it when the source directory may change or disappear
    before saving.
    """
    lazy, meta = open_fp8_checkpoint(ckpt_dir, dtype, upcast_others=upcast_others)
    state = {name: t.materialize() for name, t in lazy.items()}
    if keep_originals:
        reader = _ShardReader(meta.source_dir, meta.layout.weight_map)
        meta.originals = {w: (reader.get(w), reader.get(s)) for w, s in meta.fp8_weights.items()}
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
    # UE8M0 scale storage (raw exponent bytes, float8_e8m0fnu) holds only powers of two: quantize with such
    # scales whatever the config says, or the stored scale is rounded after the fp8 values were computed
    q, s = quantize_blockwise(master, meta.block, "ue8m0" if scale_dtype in _POW2_SCALE_DTYPES else meta.scale_fmt)
    return q, scale_from_float32(s, scale_dtype)


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
