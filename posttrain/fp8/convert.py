"""Streaming FP8 <-> BF16 conversion of DeepSeek-layout checkpoints, shard by shard.

Memory stays around two shards whatever the model size: each input shard is opened
with ``safe_open`` (mmap) and read tensor by tensor, the converted tensors of that one
shard are collected, written, and freed before the next shard (measured: peak RSS about
input shard + output shard + a few tens of MB, see benchmarks/RESULTS.md "FP8"). A scale
stored in another shard than its weight (DeepSeek's own ``fp8_cast_bf16.py`` provides
for this) is read from that shard alone.

The output is a complete checkpoint: same shard file names, a rewritten
``model.safetensors.index.json``, ``config.json`` with ``quantization_config`` dropped
(fp8 -> bf16) or added (bf16 -> fp8), and the tokenizer / generation config / other
top-level files copied, so it loads without hand edits: a bf16 result in transformers, vLLM and
this project's loaders; an FP8 result in this project's loaders (``posttrain.fp8.training.
load_pretrained``, ``engines.vllm_engine``) and in vLLM where it has block-FP8 kernels (GPU, AMX
CPU), but not in transformers' own FP8 dequantizer, which fails on a dimension that is not a
multiple of 128 (``kv_a_proj_with_mqa`` has 576 rows).

The destination must be a new or empty directory: anything else (a training run, another
checkpoint) is refused before anything is written, as is a destination inside the source or
the source inside the destination. While it runs the converter keeps a marker file
(``INCOMPLETE_MARKER``, naming the source and direction) in the destination and removes it
last, so an interrupted conversion can be rerun into the same directory: a destination with
the marker of the same source and direction, holding only files this conversion writes, is
written over. Nothing is skipped on a rerun (every shard is converted again).

CLI: ``python -m posttrain.fp8.convert fp8-to-bf16 SRC DST`` or
``python -m posttrain.fp8.convert bf16-to-fp8 SRC DST [--scale-fmt ue8m0]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from engines.capabilities import vllm_block_shape_problems

from ..errors import UserError
from .layout import (
    CONFIG_FILE,
    INDEX_FILE,
    ShardedLayout,
    block_size_from_config,
    copy_side_files,
    fp8_quantization_config,
    is_fp8_weight_name,
    is_scale_name,
    read_config,
    read_layout,
    scale_name_for,
    write_config,
    write_index,
)
from .quant import FP8_DTYPE, dequantize_blockwise, quantize_blockwise, scale_grid_shape

__all__ = ["ConversionStats", "INCOMPLETE_MARKER", "convert_fp8_to_bf16", "convert_bf16_to_fp8", "main"]

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# In the destination from before the first shard is written until after config.json is: its presence
# means "an unfinished conversion of {"src": ..., "direction": ...}" (JSON).
INCOMPLETE_MARKER = ".dsv3-posttrain-convert-incomplete"


@dataclass
class ConversionStats:
    shards: int = 0
    tensors: int = 0
    fp8_tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def read_mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)


def limit_malloc_retention(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations >= ``threshold`` with mmap and trim the heap above it.

    By default glibc raises its mmap threshold after large frees (up to 32 MB), so the
    per-tensor temporaries of a conversion come from the heap and stay resident after they
    are freed: measured with 32 MiB FP8 shards (fp8 -> bf16), 184 MiB over baseline
    without this versus 112 MiB with it (input + output shard = 95 MiB).
    Fixing both thresholds keeps the peak at the shard working set (input mmap + output
    shard). The setting is process-wide and permanent (big allocations then cost a page
    fault each), which is why the converters take ``tune_malloc``. Returns False where
    glibc's ``mallopt`` is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))
    except (OSError, AttributeError):
        return False


def _stored_dtypes(src: Path, layout: ShardedLayout) -> dict[str, str]:
    """Each tensor's safetensors dtype ("BF16", "F8_E4M3", ...), from the shard headers (no data read)."""
    dtypes: dict[str, str] = {}
    for shard, keys in layout.by_shard().items():
        try:
            with safe_open(str(src / shard), framework="pt") as f:
                dtypes.update((k, f.get_slice(k).get_dtype()) for k in keys)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{src / shard}: not a readable safetensors file ({e})") from None
    return dtypes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _set_config_dtype(config: dict, dtype_name: str) -> None:
    # transformers 5 writes "dtype", older versions "torch_dtype"; update what is there.
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = dtype_name


def _stream(
    src: Path,
    dst: Path,
    layout: ShardedLayout,
    convert_shard: Callable[[object, list[str], "_ScaleLookup", ConversionStats], dict[str, torch.Tensor]],
    progress: bool,
    desc: str,
) -> tuple[dict[str, str], int, ConversionStats]:
    stats = ConversionStats()
    t0 = time.perf_counter()
    total = sum(os.path.getsize(src / s) for s in layout.shards())
    lookup = _ScaleLookup(src, layout.weight_map)
    keys_by_shard = layout.by_shard()
    weight_map: dict[str, str] = {}
    total_size = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for shard in layout.shards():
            with safe_open(str(src / shard), framework="pt") as f:
                meta = f.metadata() or {"format": "pt"}
                out = convert_shard(f, keys_by_shard[shard], lookup, stats)
            if out:
                save_file(out, str(dst / shard), metadata=meta)
                weight_map.update(dict.fromkeys(out, shard))
                total_size += sum(_nbytes(t) for t in out.values())
            stats.shards += 1
            # Passthrough tensors from get_tensor are views of the input mmap: nothing may keep
            # one alive past this point, or the shard's pages stay resident into the next one.
            del out, f
            bar.update(os.path.getsize(src / shard))
    lookup.close()
    stats.bytes_read = total
    stats.bytes_written = sum(os.path.getsize(dst / s) for s in set(weight_map.values()))
    stats.seconds = time.perf_counter() - t0
    return weight_map, total_size, stats


# Rows are converted in slabs of whole block-rows (~2M elements) read straight from the
# mmap with ``get_slice``: block rows are independent, so the result is identical to a
# whole-tensor conversion, and the fp32 temporaries stay a few MB instead of 4x the tensor.
_SLAB_ELEMENTS = 1 << 21


def _slab_rows(rows: int, cols: int, block_rows: int) -> int:
    return max(block_rows, (_SLAB_ELEMENTS // max(cols, 1)) // block_rows * block_rows)


def _dequantize_streamed(f, name: str, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if len(shape) != 2:
        return dequantize_blockwise(f.get_tensor(name), scale, block, dtype)
    rows, cols = shape
    out = torch.empty(rows, cols, dtype=dtype)
    step = _slab_rows(rows, cols, block[0])
    for r in range(0, rows, step):
        r1 = min(r + step, rows)
        out[r:r1] = dequantize_blockwise(sl[r:r1], scale[r // block[0] : -(-r1 // block[0])], block, dtype)
    return out


def _quantize_streamed(
    f, name: str, block: tuple[int, int], scale_fmt: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    sl = f.get_slice(name)
    rows, cols = tuple(sl.get_shape())
    q = torch.empty(rows, cols, dtype=FP8_DTYPE)
    s = torch.empty(scale_grid_shape((rows, cols), block), dtype=torch.float32)
    step = _slab_rows(rows, cols, block[0])
    for r in range(0, rows, step):
        r1 = min(r + step, rows)
        q[r:r1], s[r // block[0] : -(-r1 // block[0])] = quantize_blockwise(sl[r:r1], block, scale_fmt)
    return q, s


class _ScaleLookup:
    """Reads single tensors (scales) from whichever shard holds them."""

    def __init__(self, src: Path, weight_map: dict[str, str]):
        self.src, self.weight_map = src, weight_map
        self._handles: dict[str, object] = {}

    def get(self, name: str, current: object, current_keys: set[str]) -> torch.Tensor:
        if name in current_keys:
            return current.get_tensor(name)
        shard = self.weight_map[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.src / shard), framework="pt")
        return self._handles[shard].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _read_marker(d: Path) -> dict | None:
    """The marker of an unfinished conversion in ``d`` ({} if unreadable), None if there is none."""
    marker = d / INCOMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_destination(src: Path, dst: Path, layout: ShardedLayout, direction: str) -> None:
    """Refuse a destination that holds anything but this conversion's own unfinished output."""
    if not dst.exists():
        return
    try:
        names = sorted(p.name for p in dst.iterdir())
    except OSError as e:
        raise UserError(f"dst: cannot list {dst} ({e.strerror or e})") from None
    if not names:
        return
    advice = "choose a new or empty directory, or remove it first"
    marker = _read_marker(dst)
    if marker is None:
        raise UserError(f"dst: {dst} already exists and is not empty (holds {names[0]}"
                        + (f" and {len(names) - 1} more" if len(names) > 1 else "") + f"); {advice}")
    if marker.get("src") != str(src.resolve()) or marker.get("direction") != direction:
        raise UserError(f"dst: {dst} holds an unfinished conversion of another source or direction "
                        f"({marker.get('direction', '?')} of {marker.get('src', '?')}); {advice}")
    ours = set(layout.shards()) | {INDEX_FILE, CONFIG_FILE, INCOMPLETE_MARKER}
    ours |= {p.name for p in src.iterdir() if p.is_file()}  # the side files copied from the source
    foreign = [n for n in names if n not in ours or not (dst / n).is_file()]
    if foreign:
        raise UserError(f"dst: {dst} holds an unfinished conversion and also {foreign[0]}, which the conversion "
                        f"did not write; {advice}")


def _start_destination(src: Path, dst: Path, direction: str) -> None:
    """Create ``dst`` and mark it unfinished (after every check of the input passed)."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / INCOMPLETE_MARKER).write_text(json.dumps({"src": str(src.resolve()), "direction": direction}) + "\n")


def _open_source(src: Path, dst: Path, direction: str) -> tuple[dict, ShardedLayout]:
    """The source's config and layout, checked before anything is written: a problem with the
    input or the destination is a `UserError` and leaves no (empty or partial) destination
    directory behind, and nothing already in the destination is touched."""
    if not src.is_dir():
        raise UserError(f"src: no checkpoint directory at {src}")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"dst: {dst} exists and is not a directory")
    src_r, dst_r = src.resolve(), dst.resolve()
    if src_r == dst_r:
        raise UserError(f"convert into a different directory: source and destination are both {src}")
    if dst_r.is_relative_to(src_r):
        raise UserError(f"dst: {dst} is inside the source checkpoint {src}; choose a directory outside it")
    if src_r.is_relative_to(dst_r):
        raise UserError(f"dst: {dst} contains the source checkpoint {src}; choose a directory outside it")
    if _read_marker(src) is not None:
        raise UserError(f"src: {src} is an unfinished conversion ({INCOMPLETE_MARKER} is there); "
                        "rerun the conversion that wrote it first")
    try:
        config = read_config(src)
    except OSError as e:
        raise UserError(f"{src / CONFIG_FILE}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{src / CONFIG_FILE}: not a valid JSON file ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{src / CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
    try:
        layout = read_layout(src)
    except FileNotFoundError as e:
        raise UserError(f"src: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{src / INDEX_FILE}: not a valid index ({type(e).__name__}: {e})") from None
    missing = [s for s in layout.shards() if not (src / s).is_file()]
    if missing:
        raise UserError(f"{src / INDEX_FILE} names shard files that are not there: {', '.join(missing[:3])}"
                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    _check_destination(src, dst, layout, direction)
    return config, layout


def _finish(src: Path, dst: Path, layout: ShardedLayout, weight_map: dict[str, str], total_size: int, config: dict) -> None:
    if layout.indexed:
        write_index(dst, weight_map, total_size, layout.metadata)
    copy_side_files(src, dst)
    write_config(dst, config)
    (dst / INCOMPLETE_MARKER).unlink()  # last: the checkpoint is complete


def convert_fp8_to_bf16(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    tune_malloc: bool = True,
) -> ConversionStats:
    """Dequantize every FP8 weight (128x128 blocks, partial blocks handled) to ``dtype``.

    ``*_scale_inv`` tensors are dropped; other tensors keep their stored dtype (the fp32
    ``e_score_correction_bias`` stays fp32). ``quantization_config`` is removed from the
    config and its ``dtype``/``torch_dtype`` set to ``dtype``. ``tune_malloc``: see
    :func:`limit_malloc_retention`.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    config, layout = _open_source(src, dst, "fp8-to-bf16")
    try:
        block = block_size_from_config(config)
    except ValueError as e:
        raise UserError(f"{src / CONFIG_FILE}: {e}") from None
    all_keys = set(layout.weight_map)
    fp8_names = sorted(k for k, dt in _stored_dtypes(src, layout).items() if dt == "F8_E4M3")
    if not fp8_names:
        raise UserError(f"{src}: not an FP8 checkpoint (no float8_e4m3fn weights"
                        + ("" if "quantization_config" in config else ", no quantization_config")
                        + "), nothing to dequantize")
    missing = [k for k in fp8_names if scale_name_for(k) not in all_keys]
    if missing:
        raise UserError(f"{src}: fp8 tensor {missing[0]} has no {scale_name_for(missing[0])}"
                        + (f" ({len(missing)} fp8 tensors without a scale)" if len(missing) > 1 else ""))
    _start_destination(src, dst, "fp8-to-bf16")
    if tune_malloc:
        limit_malloc_retention()

    def convert_shard(f, keys, lookup, stats) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        keyset = set(keys)
        for name in keys:
            if is_scale_name(name) and name[: -len("_scale_inv")] in all_keys:
                continue
            if f.get_slice(name).get_dtype() == "F8_E4M3":
                scale_name = scale_name_for(name)  # there (checked above)
                t = _dequantize_streamed(f, name, lookup.get(scale_name, f, keyset), block, dtype)
                stats.fp8_tensors += 1
            else:
                t = f.get_tensor(name)
            out[name] = t
            stats.tensors += 1
        return out

    weight_map, total_size, stats = _stream(src, dst, layout, convert_shard, progress, "fp8->bf16")
    config.pop("quantization_config", None)
    _set_config_dtype(config, _DTYPE_NAMES[dtype])
    _finish(src, dst, layout, weight_map, total_size, config)
    return stats


def convert_bf16_to_fp8(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    scale_fmt: str | None = None,
    block: tuple[int, int] = (128, 128),
    weight_filter: Callable[[str], bool] = is_fp8_weight_name,
    progress: bool = True,
    tune_malloc: bool = True,
) -> ConversionStats:
    """Quantize the attention / MLP / expert Linear weights to FP8 with per-block amax scales.

    Which tensors: ``weight_filter`` (default :func:`layout.is_fp8_weight_name`, DeepSeek's
    choice). Everything else keeps its stored dtype. ``quantization_config`` (with
    ``scale_fmt`` for ``"ue8m0"``) is added to the config. Logs a warning for shapes vLLM's
    block-FP8 loader rejects (see :func:`vllm_block_shape_problems`). ``tune_malloc``: see
    :func:`limit_malloc_retention`.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    config, layout = _open_source(src, dst, "bf16-to-fp8")
    if "quantization_config" in config:
        raise UserError(f"{src} already has a quantization_config (an FP8 checkpoint?): "
                        f"{config['quantization_config']}")
    fp8 = next((k for k, dt in _stored_dtypes(src, layout).items() if dt.startswith("F8")), None)
    if fp8 is not None:
        raise UserError(f"{src}: {fp8} is already fp8 (convert fp8-to-bf16 first)")
    _start_destination(src, dst, "bf16-to-fp8")
    if tune_malloc:
        limit_malloc_retention()

    def convert_shard(f, keys, lookup, stats) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in keys:
            sl = f.get_slice(name)
            st_dtype, ndim = sl.get_dtype(), len(sl.get_shape())
            if st_dtype.startswith("F8"):  # checked before anything was written
                raise UserError(f"{name} is already fp8")
            if weight_filter(name) and ndim == 2 and st_dtype in ("BF16", "F16", "F32", "F64"):
                out[name], out[scale_name_for(name)] = _quantize_streamed(f, name, block, scale_fmt)
                stats.fp8_tensors += 1
            else:
                out[name] = f.get_tensor(name)
            stats.tensors += 1
        return out

    weight_map, total_size, stats = _stream(src, dst, layout, convert_shard, progress, "bf16->fp8")
    config["quantization_config"] = fp8_quantization_config(block, scale_fmt)
    for problem in vllm_block_shape_problems(config, block_size_from_config(config)[0]):
        log.warning("FP8 checkpoint may not load in vLLM: %s", problem)
    _finish(src, dst, layout, weight_map, total_size, config)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """``fp8-to-bf16 SRC DST [--dtype bfloat16|float32]`` / ``bf16-to-fp8 SRC DST [--scale-fmt ue8m0]``."""
    p = argparse.ArgumentParser(prog="convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("fp8-to-bf16", help="dequantize a DeepSeek FP8 checkpoint")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    b = sub.add_parser("bf16-to-fp8", help="quantize to DeepSeek block FP8")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--scale-fmt", default=None, choices=["ue8m0"], help="power-of-two scales (DeepSeek-V3.1)")
    b.add_argument("--block", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"))
    for s in (a, b):
        s.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "fp8-to-bf16":
        stats = convert_fp8_to_bf16(args.src, args.dst, dtype=_DTYPES[args.dtype], progress=not args.no_progress)
    else:
        stats = convert_bf16_to_fp8(
            args.src, args.dst, scale_fmt=args.scale_fmt, block=tuple(args.block), progress=not args.no_progress
        )
    print(
        f"{args.cmd}: {stats.shards} shards, {stats.tensors} tensors ({stats.fp8_tensors} fp8), "
        f"{stats.bytes_read / 1e6:.1f} MB read, {stats.bytes_written / 1e6:.1f} MB written, "
        f"{stats.seconds:.1f} s ({stats.read_mb_per_s:.1f} MB/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
