"""Streaming FP8 <-> BF16 conversion (posttrain.fp8.convert)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engines.capabilities import vllm_block_shape_problems
from posttrain.errors import UserError
from posttrain.fp8.convert import (
    INCOMPLETE_MARKER,
    convert_bf16_to_fp8,
    convert_fp8_to_bf16,
    main,
)
from posttrain.fp8.layout import INDEX_FILE, fp8_quantization_config, is_fp8_weight_name
from posttrain.fp8.quant import FP8_DTYPE, dequantize_blockwise, e4m3_error_bound, expand_scale
from posttrain.fp8.synthetic import write_synthetic_checkpoint


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    index = json.loads((d / INDEX_FILE).read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        with safe_open(str(d / shard), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _check_index(d: Path) -> None:
    index = json.loads((d / INDEX_FILE).read_text())
    total = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(str(d / shard), framework="pt") as f:
            assert set(f.keys()) == {k for k, s in index["weight_map"].items() if s == shard}
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize(
    "name, fp8",
    [
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),
        ("model.layers.3.self_attn.q_a_proj.weight", True),
        ("model.layers.3.self_attn.q_proj.weight", True),
        ("model.layers.3.self_attn.o_proj.weight", True),
        ("model.layers.0.mlp.down_proj.weight", True),
        ("model.layers.5.mlp.shared_experts.gate_proj.weight", True),
        ("model.layers.5.mlp.experts.255.up_proj.weight", True),
        ("model.layers.61.self_attn.kv_b_proj.weight", True),  # the MTP module's own block
        ("model.layers.61.mlp.experts.0.down_proj.weight", True),
        ("model.layers.61.eh_proj.weight", False),
        ("model.layers.61.shared_head.head.weight", False),
        ("model.layers.61.enorm.weight", False),
        ("model.layers.5.mlp.gate.weight", False),
        ("model.layers.5.mlp.gate.e_score_correction_bias", False),
        ("model.layers.3.self_attn.q_a_layernorm.weight", False),
        ("model.embed_tokens.weight", False),
        ("lm_head.weight", False),
        ("model.layers.5.mlp.experts.gate_up_proj", False),
    ],
)
def test_which_tensors_are_fp8(name, fp8):
    assert is_fp8_weight_name(name) is fp8


def test_fp8_to_bf16_and_back(tmp_path):
    src = write_synthetic_checkpoint(tmp_path / "fp8", fp8=True, shard_bytes=300_000)
    src_t = _tensors(src)
    bf = tmp_path / "bf16"
    stats = convert_fp8_to_bf16(src, bf, progress=False)
    bf_t = _tensors(bf)
    assert stats.fp8_tensors == sum(1 for k in src_t if k.endswith("_scale_inv")) > 0
    assert set(bf_t) == {k for k in src_t if not k.endswith("_scale_inv")}
    for k, t in bf_t.items():
        if src_t[k].dtype == FP8_DTYPE:
            want = dequantize_blockwise(src_t[k], src_t[k + "_scale_inv"], out_dtype=torch.bfloat16)
            assert t.dtype == torch.bfloat16 and torch.equal(t, want), k
        else:
            assert t.dtype == src_t[k].dtype and torch.equal(t, src_t[k]), k
    _check_index(bf)
    cfg = json.loads((bf / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert (bf / "tokenizer_config.json").exists() and (bf / "generation_config.json").exists()

    fp8 = tmp_path / "fp8again"
    assert main(["bf16-to-fp8", str(bf), str(fp8), "--scale-fmt", "ue8m0", "--no-progress"]) == 0
    q_t = _tensors(fp8)
    assert set(q_t) == set(src_t)
    for k, t in bf_t.items():
        if is_fp8_weight_name(k):
            q, s = q_t[k], q_t[k + "_scale_inv"]
            assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == src_t[k + "_scale_inv"].shape
            assert torch.equal(s, torch.exp2(torch.log2(s).round()))
            err = (dequantize_blockwise(q, s, out_dtype=torch.float32) - t.float()).abs()
            assert bool((err <= e4m3_error_bound(t, expand_scale(s, t.shape, (128, 128))) * (1 + 1e-5)).all()), k
        else:
            assert torch.equal(q_t[k], t) and q_t[k].dtype == t.dtype, k
    _check_index(fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == fp8_quantization_config(scale_fmt="ue8m0")
    with pytest.raises(UserError, match="already has a quantization_config"):
        convert_bf16_to_fp8(fp8, tmp_path / "twice", progress=False)
    assert not (tmp_path / "twice").exists()


def _cli_error(argv: list[str], capsys) -> str:
    import cli

    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_convert_input_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    """Each was a ValueError traceback, or (a missing source) left an empty destination directory."""
    bf = write_synthetic_checkpoint(tmp_path / "bf16", fp8=False, shard_bytes=300_000)
    fp8 = write_synthetic_checkpoint(tmp_path / "fp8", fp8=True, shard_bytes=300_000)
    dst = tmp_path / "dst"
    prefix = "dsv3-posttrain convert: error: "
    assert _cli_error(["convert", "bf16-to-fp8", str(bf), str(bf)], capsys) == (
        f"{prefix}convert into a different directory: source and destination are both {bf}")
    assert _cli_error(["convert", "bf16-to-fp8", str(fp8), str(dst)], capsys).startswith(
        f"{prefix}{fp8} already has a quantization_config")
    assert _cli_error(["convert", "fp8-to-bf16", str(tmp_path / "missing"), str(dst)], capsys) == (
        f"{prefix}src: no checkpoint directory at {tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    assert "no model.safetensors.index.json or model.safetensors in" in _cli_error(
        ["convert", "bf16-to-fp8", str(tmp_path / "empty"), str(dst)], capsys)
    (tmp_path / "afile").write_text("keep me\n")
    assert _cli_error(["convert", "bf16-to-fp8", str(bf), str(tmp_path / "afile")], capsys) == (
        f"{prefix}dst: {tmp_path / 'afile'} exists and is not a directory")
    assert (tmp_path / "afile").read_text() == "keep me\n"
    # fp8 weights without a quantization_config: found in the headers before anything is written
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg.pop("quantization_config")
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"\.weight is already fp8 \(convert fp8-to-bf16 first\)"):
        convert_bf16_to_fp8(fp8, dst, progress=False)
    (bf / "config.json").write_text("{bad")
    with pytest.raises(UserError, match=r"config\.json: not a valid JSON file"):
        convert_bf16_to_fp8(bf, dst, progress=False)
    assert not dst.exists()


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_convert_refuses_a_destination_with_other_content_and_nested_directories(tmp_path, capsys):
    """A finished SFT run given as DST had its model.safetensors and config.json replaced while trainer_state.json
    and checkpoint-2 stayed: a mixed, corrupt directory. Now refused, one line, before anything is written."""
    bf = write_synthetic_checkpoint(tmp_path / "bf16", fp8=False, shard_bytes=300_000)
    fp8 = write_synthetic_checkpoint(tmp_path / "fp8", fp8=True, shard_bytes=300_000)
    run = tmp_path / "sft-run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}\n")
    (run / "trainer_state.json").write_text('{"global_step": 2}\n')
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "config.json").write_text('{"dtype": "float32"}\n')
    before = _snapshot(run)
    prefix = "dsv3-posttrain convert: error: "
    for direction, src in (("bf16-to-fp8", bf), ("fp8-to-bf16", fp8)):
        assert _cli_error(["convert", direction, str(src), str(run)], capsys) == (
            f"{prefix}dst: {run} already exists and is not empty (holds checkpoint-2 and 3 more); "
            "choose a new or empty directory, or remove it first")
        assert _snapshot(run) == before
    # inside the source: it would become part of the input checkpoint; the source inside the destination
    assert _cli_error(["convert", "bf16-to-fp8", str(bf), str(bf / "fp8")], capsys) == (
        f"{prefix}dst: {bf / 'fp8'} is inside the source checkpoint {bf}; choose a directory outside it")
    assert not (bf / "fp8").exists()
    assert _cli_error(["convert", "bf16-to-fp8", str(bf), str(tmp_path)], capsys) == (
        f"{prefix}dst: {tmp_path} contains the source checkpoint {bf}; choose a directory outside it")
    # a new or an empty directory is fine
    (tmp_path / "empty").mkdir()
    convert_bf16_to_fp8(bf, tmp_path / "empty", progress=False)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(p.name for p in bf.iterdir())


def test_an_interrupted_conversion_reruns_into_its_own_destination(tmp_path, monkeypatch, capsys):
    """The converter marks its destination unfinished until config.json is written: a killed conversion can be
    rerun into the same directory; a finished one, or another conversion's leftovers, are refused."""
    import posttrain.fp8.convert as conv

    src = write_synthetic_checkpoint(tmp_path / "fp8", fp8=True, shard_bytes=300_000)
    assert len(set(json.loads((src / INDEX_FILE).read_text())["weight_map"].values())) > 2
    dst, fresh = tmp_path / "bf16", tmp_path / "bf16-fresh"
    real_save, calls = conv.save_file, []

    def killed_after_one_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[1])
        real_save(*args, **kwargs)

    monkeypatch.setattr(conv, "save_file", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_fp8_to_bf16(src, dst, progress=False)
    monkeypatch.setattr(conv, "save_file", real_save)
    assert sorted(p.name for p in dst.iterdir()) == sorted([INCOMPLETE_MARKER, Path(calls[0]).name])
    # the other direction, or another source, may not take the unfinished directory over
    other = write_synthetic_checkpoint(tmp_path / "other", fp8=True, shard_bytes=300_000, seed=1)
    prefix = "dsv3-posttrain convert: error: "
    assert _cli_error(["convert", "fp8-to-bf16", str(other), str(dst)], capsys).startswith(
        f"{prefix}dst: {dst} holds an unfinished conversion of another source or direction (fp8-to-bf16 of {src}")

    convert_fp8_to_bf16(src, dst, progress=False)  # the rerun
    convert_fp8_to_bf16(src, fresh, progress=False)
    assert _snapshot(dst) == _snapshot(fresh) and not (dst / INCOMPLETE_MARKER).exists()
    # finished: a second run into it is refused like any other non-empty directory
    assert _cli_error(["convert", "fp8-to-bf16", str(src), str(dst)], capsys).startswith(
        f"{prefix}dst: {dst} already exists and is not empty")
    # an unfinished directory that also holds something the conversion did not write
    (fresh / INCOMPLETE_MARKER).write_text(json.dumps({"src": str(src.resolve()), "direction": "fp8-to-bf16"}))
    (fresh / "notes.txt").write_text("mine\n")
    assert _cli_error(["convert", "fp8-to-bf16", str(src), str(fresh)], capsys) == (
        f"{prefix}dst: {fresh} holds an unfinished conversion and also notes.txt, which the conversion did not "
        "write; choose a new or empty directory, or remove it first")
    # an unfinished conversion is no source
    assert _cli_error(["convert", "bf16-to-fp8", str(fresh), str(tmp_path / "x")], capsys).startswith(
        f"{prefix}src: {fresh} is an unfinished conversion")
    assert (fresh / "notes.txt").read_text() == "mine\n" and not (tmp_path / "x").exists()


def test_fp8_to_bf16_refuses_a_checkpoint_without_fp8_weights(tiny_model_dir, tmp_path, capsys):
    """The tiny float32 model "converted" fine and came out with config dtype bfloat16 over float32 tensors."""
    dst = tmp_path / "bf16"
    assert _cli_error(["convert", "fp8-to-bf16", str(tiny_model_dir), str(dst)], capsys) == (
        f"dsv3-posttrain convert: error: {tiny_model_dir}: not an FP8 checkpoint (no float8_e4m3fn weights, "
        "no quantization_config), nothing to dequantize")
    assert not dst.exists()


def test_vllm_block_shape_warnings():
    assert vllm_block_shape_problems({"moe_intermediate_size": 2048, "intermediate_size": 18432, "q_lora_rank": 1536}) == []
    problems = vllm_block_shape_problems({"moe_intermediate_size": 64, "q_lora_rank": 96})
    assert len(problems) == 2 and "moe_intermediate_size=64" in problems[0]


_CONVERT = """
import sys
from posttrain.fp8.convert import main
if sys.argv[1] != "baseline":
    main(sys.argv[1:] + ["--no-progress"])
"""


def _max_shard(d: Path) -> int:
    return max(p.stat().st_size for p in d.glob("*.safetensors"))


@pytest.mark.slow
def test_streaming_conversion_peak_rss_is_about_two_shards(tmp_path, peak_rss):
    """Peak RSS of each direction, over an interpreter that only imported the converter, stays
    within input shard + output shard + max(48 MiB, half an output shard) of temporaries, while the larger side of the
    checkpoint is over twice that: a converter that held the whole input or output would blow it."""
    src = write_synthetic_checkpoint(
        tmp_path / "fp8", fp8=True, shard_bytes=32 << 20, num_layers=4, hidden=2048, moe_intermediate=1024, n_experts=8
    )
    baseline = peak_rss(_CONVERT, "baseline")
    bf, fp8 = tmp_path / "bf16", tmp_path / "fp8again"
    for direction, a, b in (("fp8-to-bf16", src, bf), ("bf16-to-fp8", bf, fp8)):
        delta = peak_rss(_CONVERT, direction, str(a), str(b)) - baseline
        in_shard, out_shard = _max_shard(a), _max_shard(b)
        total = max(sum(p.stat().st_size for p in d.glob("*.safetensors")) for d in (a, b))
        bound = in_shard + out_shard + max(48 << 20, out_shard // 2)
        assert total > 2 * bound, "checkpoint too small for the test to mean anything"
        print(f"{direction}: peak - baseline {delta / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
        assert delta <= bound, f"{direction}: peak {delta / 2**20:.0f} MiB over baseline > bound {bound / 2**20:.0f} MiB"
    # the chained round trip reproduces the source's layout
    assert json.loads((fp8 / INDEX_FILE).read_text())["weight_map"].keys() == json.loads(
        (src / INDEX_FILE).read_text()
    )["weight_map"].keys()
