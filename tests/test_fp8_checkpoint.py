"""FP8 checkpoint load/save (posttrain.fp8.checkpoint) on a synthetic multi-shard DeepSeek-layout checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from posttrain.fp8.checkpoint import _ShardReader, load_fp8_checkpoint, open_fp8_checkpoint, save_fp8_checkpoint
from posttrain.fp8.layout import INDEX_FILE, fp8_quantization_config
from posttrain.fp8.quant import FP8_DTYPE, FP8_MAX, dequantize_blockwise
from posttrain.fp8.synthetic import write_synthetic_checkpoint

KV_A = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
EXPERT = "model.layers.1.mlp.experts.2.down_proj.weight"  # 256 x 130: partial column block


def _read_all(d: Path) -> dict[str, tuple[str, torch.Tensor]]:
    index = json.loads((d / INDEX_FILE).read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        with safe_open(str(d / shard), framework="pt") as f:
            out[name] = (shard, f.get_tensor(name))
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _assert_index_consistent(d: Path) -> None:
    index = json.loads((d / INDEX_FILE).read_text())
    listed: dict[str, set[str]] = {}
    for name, shard in index["weight_map"].items():
        listed.setdefault(shard, set()).add(name)
    total = 0
    for shard, names in listed.items():
        with safe_open(str(d / shard), framework="pt") as f:
            assert set(f.keys()) == names, shard
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names)
    assert index["metadata"]["total_size"] == total
    assert {p.name for p in d.glob("*.safetensors")} == set(listed)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("fp8") / "src", fp8=True, shard_bytes=400_000)


def test_synthetic_checkpoint_is_deepseek_like(fp8_ckpt):
    tensors = _read_all(fp8_ckpt)
    shards = {s for s, _ in tensors.values()}
    assert len(shards) >= 3
    assert tensors[KV_A][1].dtype == FP8_DTYPE and tensors[KV_A + "_scale_inv"][1].shape == (5, 2)
    assert tensors["model.embed_tokens.weight"][1].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.weight"][1].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"][1].dtype == torch.float32
    assert any(tensors[n][0] != tensors[n + "_scale_inv"][0] for n in tensors if n + "_scale_inv" in tensors)


def test_open_reads_headers_only_and_its_lazy_tensors_are_the_loaded_ones(fp8_ckpt, monkeypatch):
    """The lazy form `load_pretrained` hands to transformers: no tensor is read (or dequantized)
    until indexed, then it equals the eager loader's, whole or sliced."""
    reads: list[str] = []
    get = _ShardReader.get
    monkeypatch.setattr(_ShardReader, "get", lambda self, name: reads.append(name) or get(self, name))
    lazy, meta = open_fp8_checkpoint(fp8_ckpt, torch.float32)
    assert reads == []
    state, eager_meta = load_fp8_checkpoint(fp8_ckpt, torch.float32)
    assert set(lazy) == set(state) and meta.fp8_weights == eager_meta.fp8_weights and meta.dtypes == eager_meta.dtypes
    reads.clear()
    assert torch.equal(lazy[KV_A][...], state[KV_A])
    assert reads == [KV_A, KV_A + "_scale_inv"]
    assert torch.equal(lazy[EXPERT][1:3], state[EXPERT][1:3])
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert lazy[bias][...].dtype == torch.float32 and torch.equal(lazy[bias][...], state[bias])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_save_is_byte_identical(fp8_ckpt, tmp_path, dtype):
    state, meta = load_fp8_checkpoint(fp8_ckpt, dtype)
    assert state[KV_A].dtype == dtype and state[KV_A].shape == (576, 256)
    assert not any(k.endswith("_scale_inv") for k in state)
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    src = _read_all(fp8_ckpt)
    assert set(meta.fp8_weights) == {k for k in src if k + "_scale_inv" in src}
    # the dequantized value is the ceil-block product
    want = dequantize_blockwise(src[EXPERT][1], src[EXPERT + "_scale_inv"][1], out_dtype=torch.float32)
    assert torch.equal(state[EXPERT], want.to(dtype))

    out = tmp_path / "out"
    save_fp8_checkpoint(state, meta, out)
    got = _read_all(out)
    assert got.keys() == src.keys()
    for name, (shard, t) in src.items():
        g_shard, g = got[name]
        assert g_shard == shard, name
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert _bytes(g) == _bytes(t), name
    _assert_index_consistent(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == fp8_quantization_config()
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()


def test_changed_weight_is_requantized_others_kept(fp8_ckpt, tmp_path):
    state, meta = load_fp8_checkpoint(fp8_ckpt, torch.float32, upcast_others=True)
    assert state["model.embed_tokens.weight"].dtype == torch.float32  # widened for training
    g = torch.Generator().manual_seed(3)
    new = torch.randn(state[EXPERT].shape, generator=g) * 0.01
    state[EXPERT] = new
    state["model.norm.weight"] = state["model.norm.weight"] + 1.0
    save_fp8_checkpoint(state, meta, tmp_path / "out")
    src, got = _read_all(fp8_ckpt), _read_all(tmp_path / "out")
    for name in src:
        same = _bytes(src[name][1]) == _bytes(got[name][1])
        assert same == (name not in (EXPERT, EXPERT + "_scale_inv", "model.norm.weight")), name
    q, s = got[EXPERT][1], got[EXPERT + "_scale_inv"][1]
    assert q.dtype == FP8_DTYPE and s.shape == (2, 2) and s.dtype == torch.float32
    assert float(s[0, 0]) == pytest.approx(float(new[:128, :128].abs().max()) / FP8_MAX, rel=1e-6)
    rel = (dequantize_blockwise(q, s, out_dtype=torch.float32) - new).norm() / new.norm()
    assert float(rel) < 0.05
    assert got["model.norm.weight"][1].dtype == torch.bfloat16
    assert got["model.embed_tokens.weight"][1].dtype == torch.bfloat16


def test_save_in_place_and_from_memory(fp8_ckpt, tmp_path):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(fp8_ckpt, work)
    state, meta = load_fp8_checkpoint(work, torch.bfloat16, keep_originals=True)
    before = {k: _bytes(t) for k, (_, t) in _read_all(work).items()}
    save_fp8_checkpoint(state, meta, work)  # into its own source directory
    after = {k: _bytes(t) for k, (_, t) in _read_all(work).items()}
    assert before == after
    assert not list(work.glob(".*.tmp"))
    _assert_index_consistent(work)


def test_missing_tensor_is_an_error(fp8_ckpt, tmp_path):
    state, meta = load_fp8_checkpoint(fp8_ckpt, torch.bfloat16)
    del state[KV_A]
    with pytest.raises(KeyError, match="missing"):
        save_fp8_checkpoint(state, meta, tmp_path / "out")


def test_ue8m0_checkpoint_requantizes_to_powers_of_two(tmp_path):
    src = write_synthetic_checkpoint(tmp_path / "src", fp8=True, scale_fmt="ue8m0", shard_bytes=400_000)
    state, meta = load_fp8_checkpoint(src, torch.float32)
    assert meta.scale_fmt == "ue8m0"
    state[KV_A] = state[KV_A] * 1.37
    save_fp8_checkpoint(state, meta, tmp_path / "out")
    s = _read_all(tmp_path / "out")[KV_A + "_scale_inv"][1]
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"


def test_raw_ue8m0_byte_scales_are_written_as_exponent_bytes(tmp_path):
    """Scales stored as uint8 (biased exponents, which the loader reads) were written back with `.to(uint8)`,
    the value cast: a re-quantized weight's scale byte became 0 and the weight dequantized to about zero."""
    from safetensors.torch import load_file, save_file

    src = write_synthetic_checkpoint(tmp_path / "src", fp8=True, scale_fmt="ue8m0", shard_bytes=10_000_000)
    for f in src.glob("*.safetensors"):
        state = load_file(f)
        for k in [k for k in state if k.endswith("_scale_inv")]:
            state[k] = (torch.frexp(state[k]).exponent - 1 + 127).to(torch.uint8)
        save_file(state, f, metadata={"format": "pt"})
    state, meta = load_fp8_checkpoint(src, torch.float32)
    state[KV_A] = state[KV_A] * 1.01
    save_fp8_checkpoint(state, meta, tmp_path / "out")
    _, scale = _read_all(tmp_path / "out")[KV_A + "_scale_inv"]
    assert scale.dtype == torch.uint8 and int(scale.min()) > 0
    reloaded, _ = load_fp8_checkpoint(tmp_path / "out", torch.float32)
    err = (reloaded[KV_A] - state[KV_A]).abs().max() / state[KV_A].abs().max()
    assert err <= 1 / 16 + 1e-6, err  # e4m3: half a step at the top of a binade (3 mantissa bits)


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="torch without float8_e8m0fnu")
def test_e8m0_scales_without_scale_fmt_are_requantized_to_powers_of_two(tmp_path):
    """Scales stored as float8_e8m0fnu (F8_E8M0, which the loader reads) in a checkpoint whose config names no
    `scale_fmt`: a re-quantized weight got amax/448 scales cast to e8m0, i.e. rounded to a power of two after its
    fp8 values had been computed with the exact scale -- the saved weight was off by up to 2x (25% measured)."""
    from safetensors.torch import load_file, save_file

    src = write_synthetic_checkpoint(tmp_path / "src", fp8=True, scale_fmt="ue8m0", shard_bytes=10_000_000)
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]["scale_fmt"]
    (src / "config.json").write_text(json.dumps(config))
    for f in src.glob("*.safetensors"):
        state = load_file(f)
        for k in [k for k in state if k.endswith("_scale_inv")]:
            state[k] = state[k].to(torch.float8_e8m0fnu)  # powers of two: exact
        save_file(state, f, metadata={"format": "pt"})
    state, meta = load_fp8_checkpoint(src, torch.float32)
    assert meta.scale_fmt is None
    state[KV_A] = state[KV_A] * 1.01
    save_fp8_checkpoint(state, meta, tmp_path / "out")
    assert _read_all(tmp_path / "out")[KV_A + "_scale_inv"][1].dtype == torch.float8_e8m0fnu
    reloaded, _ = load_fp8_checkpoint(tmp_path / "out", torch.float32)
    err = (reloaded[KV_A] - state[KV_A]).abs().max() / state[KV_A].abs().max()
    assert err <= 1 / 16 + 1e-6, err  # e4m3: half a step at the top of a binade (3 mantissa bits)
