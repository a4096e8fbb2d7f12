"""benchmarks/bench_gpu_sft.py (issue 13 item 6): the SFT step benchmark's CPU smoke mode, its
batches and its FLOP count (the MFU formula), checked against the model config by hand."""

from __future__ import annotations

import json
import os
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu_sft as bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cpu_smoke_rows_for_each_variant_and_row_length():
    args = bench.parse_args(["--cpu-smoke", "--seqs", "64,96", "--iters", "2", "--peak-tflops", "1"])
    assert (args.preset, args.layers, args.vocab, args.warmup) == ("tiny", 2, 1024, 1)
    rows = bench.run_sft_step_bench(args)
    assert [(r["variant"], r["seq"]) for r in rows] == [("fp32", 64), ("fp32", 96), ("fp8", 64), ("fp8", 96)]
    for r in rows:
        assert "error" not in r, r
        assert r["attn"] == "sdpa_segmented" and r["steps"] == 2 and len(r["step_s"]) == 2
        assert all(r["seq"] - 15 <= w <= r["seq"] for w in r["widths"])
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] * 2 / sum(r["step_s"]), rel=1e-2)
        assert r["mfu_total"] > r["mfu_body"] > 0 and r["model_tflops_per_s"] > 0
        # MFU against a 1 TF/s peak is the model TF/s itself
        assert r["mfu_total"] == pytest.approx(r["model_tflops_per_s"], rel=1e-9)
        assert r["max_over_median"] >= 1.0 and isinstance(r["stall_free"], bool)
        assert all(math.isfinite(x) for x in r["losses"]) and r["peak_mem_gib"] > 0
    assert rows[2]["fp8"] and rows[2]["fp8_modules"] > 0 and rows[2]["experts"] == "posttrain_fp8"
    assert not rows[0]["fp8"] and rows[0]["experts"] == "posttrain_grouped"


def test_flop_count_matches_the_config_by_hand():
    """N_act from the parameters equals the count written from the V3 architecture (report §2.1):
    MLA projections, dense MLP, router + shared experts + top_k/E of the routed experts, the MTP
    module's eh_proj and block, and the output head once per head (main + MTP depth)."""
    args = bench.parse_args(["--cpu-smoke"])
    model = bench.build_model(args, torch.float32, torch.device("cpu"))
    c = model.config
    H, V, h = c.hidden_size, c.vocab_size, c.num_attention_heads
    d_qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    attn = (H * c.q_lora_rank + c.q_lora_rank * h * d_qk + H * (c.kv_lora_rank + c.qk_rope_head_dim)
            + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim * H)
    dense = 3 * H * c.intermediate_size
    moe = c.n_routed_experts * H + 3 * H * c.moe_intermediate_size * (c.n_shared_experts + c.num_experts_per_tok)
    n_main, n_mtp = c.num_hidden_layers, 1
    body = n_main * attn + c.first_k_dense_replace * dense + (n_main - c.first_k_dense_replace) * moe
    body += n_mtp * (2 * H * H + attn + moe)  # the MTP module: eh_proj + a full MoE block
    counts = bench.flop_params(model)
    assert counts["n_act_body"] == pytest.approx(body, rel=1e-12)
    assert counts["n_act"] == pytest.approx(body + (1 + n_mtp) * V * H, rel=1e-12)
    layers = n_main + n_mtp
    assert bench.attention_flops(model, [10, 20]) == 3 * layers * h * (100 + 400) * (d_qk + c.v_head_dim)


def test_batches_are_packed_rows_with_restarting_positions():
    g = torch.Generator().manual_seed(3)
    widths = set()
    for _ in range(50):
        batch, lengths = bench.make_batch(128, 1024, g, jitter=15)
        n = batch["input_ids"].shape[1]
        widths.add(n)
        assert 113 <= n <= 128 and sum(lengths) == n and min(lengths) >= 2
        assert batch["position_ids"].shape == batch["input_ids"].shape == batch["labels"].shape
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
        assert (batch["position_ids"][0, starts] == 0).all() and int((batch["position_ids"] == 0).sum()) == len(lengths)
        assert (batch["labels"][0, starts] == -100).all() and int((batch["labels"] == -100).sum()) == len(lengths)
        assert int(batch["sample_ids"].max()) == len(lengths)
    assert len(widths) > 5  # widths vary like packed rows do
    fixed, _ = bench.make_batch(128, 1024, g, jitter=0)
    assert fixed["input_ids"].shape[1] == 128
    # full-size rows: the H100 report's samples of 256-2048 tokens (the last one cut to fit)
    row, lengths = bench.make_batch(8192, 1024, g, jitter=0)
    assert row["input_ids"].shape[1] == sum(lengths) == 8192 and all(256 <= n <= 2048 for n in lengths[:-1])


def test_fp8_rows_get_the_trainers_pad_segment_and_only_real_tokens_count():
    """The fp8 rows pad like the SFT trainer's collator does on CUDA (to 128 tokens: a pad segment with its
    own positions, never a target, outside token_mask), and tokens/s counts the real tokens only."""
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        batch, lengths = bench.make_batch(300, 1024, g, jitter=15, pad_to=128)
        width, n = sum(lengths), batch["input_ids"].shape[1]
        assert n % 128 == 0 and 0 <= n - width < 128
        assert batch["token_mask"][0, :width].all() and not batch["token_mask"][0, width:].any()
        assert (batch["labels"][0, width:] == -100).all()
        if n > width:  # the pad segment restarts its positions and is a sample of its own
            assert batch["position_ids"][0, width:].tolist() == list(range(n - width))
            assert int(batch["sample_ids"][0, width]) == len(lengths) + 1
    args = bench.parse_args(["--cpu-smoke", "--seqs", "100", "--iters", "2", "--variants", "fp8",
                             "--pad-to-multiple-of", "64"])
    (row,) = bench.run_sft_step_bench(args)
    assert "error" not in row, row
    assert row["pad_to_multiple_of"] == 64 and all(w % 64 == 0 for w in row["padded_widths"])
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] * row["steps"] / sum(row["step_s"]), rel=1e-2)
    assert row["tokens_per_step"] <= 100
    assert max(row["widths"]) <= 100 < min(row["padded_widths"])
    # auto: what the trainer does, i.e. no padding off CUDA
    (auto,) = bench.run_sft_step_bench(bench.parse_args(["--cpu-smoke", "--seqs", "64", "--iters", "1", "--variants", "fp8"]))
    assert auto["pad_to_multiple_of"] is None and auto["padded_widths"] == auto["widths"]


def test_fp32_master_variant_trains_fp32_weights_with_bf16_compute():
    """Issue #13 item 4's "bf16 compute with fp32 master weights": FSDP2's MixedPrecisionPolicy on one rank.
    The parameters the optimizer steps stay fp32; the forward runs in bf16, so its first loss equals the
    fp32 one to bf16 rounding (not exactly); the one-process group is torn down after the row."""
    import torch.distributed as dist

    args = bench.parse_args(["--cpu-smoke", "--seqs", "64", "--iters", "2", "--variants", "fp32,fp32-master",
                             "--width-jitter", "0"])
    fp32, master = bench.run_sft_step_bench(args)
    assert "error" not in master, master
    assert master["param_dtypes"] == fp32["param_dtypes"] == ["float32"]
    assert master["compute"].startswith("bfloat16")
    assert master["losses"][0] != fp32["losses"][0]
    assert master["losses"][0] == pytest.approx(fp32["losses"][0], rel=2e-2)
    assert all(math.isfinite(x) for x in master["losses"]) and not dist.is_initialized()


def test_main_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "sft.json"
    bench.main(["--cpu-smoke", "--seqs", "64", "--iters", "2", "--variants", "fp32", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__ and len(data["rows"]) == 1
    printed = capsys.readouterr().out
    assert "| fp32 | 64 | sdpa_segmented |" in printed and "MFU =" in printed
    with pytest.raises(ValueError, match="unknown variant"):
        bench.run_sft_step_bench(bench.parse_args(["--cpu-smoke", "--variants", "fp16"]))


def test_profile_pass_prints_the_top_operators_and_writes_a_trace(tmp_path):
    """`--profile DIR`: the profiler pass over the step the issue asks for, one trace per row."""
    args = bench.parse_args(["--cpu-smoke", "--seqs", "64", "--variants", "fp32", "--iters", "1",
                             "--profile", str(tmp_path), "--profile-steps", "1"])
    (row,) = bench.run_sft_step_bench(args)
    assert "error" not in row, row
    assert "Self CPU" in row["profile"] and "aten::" in row["profile"]
    assert json.loads((tmp_path / "trace-fp32-64.json").read_text())["traceEvents"]
    assert row["host_syncs_per_step"] is None  # counted with torch's sync debug mode, on CUDA only
    assert "host syncs/step" in bench.format_table([row])


def test_the_mfu_peak_follows_the_card_not_its_name_prefix(monkeypatch):
    args = bench.parse_args(["--cpu-smoke"])
    peaks = {}
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H800 PCIe"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        peaks[name] = bench._peak_tflops(args, torch.device("cuda"))
    assert peaks == {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
                     "NVIDIA H200": 989.0, "NVIDIA H800 PCIe": 756.0}


def test_an_unfused_variant_switches_every_fused_kernel_off_for_its_rows_only(monkeypatch):
    """`bf16-unfused` and the like: the A/B of the toolkit's glue kernels (RMSNorm, MoE routing, MLA assembly,
    SwiGLU) in one process. The switches are "0" while its row runs, and as they were before and after."""
    seen = {}

    def fake_run(args, variant, seq, device):
        seen[variant] = {k: os.environ.get(k) for k in bench.FUSED_KERNEL_SWITCHES}
        return {"variant": variant, "seq": seq}

    monkeypatch.setattr(bench, "_run_variant", fake_run)
    monkeypatch.setenv("POSTTRAIN_FUSED_MLA", "1")
    rows = bench.run_sft_step_bench(bench.parse_args(["--cpu-smoke", "--seqs", "64", "--variants", "fp32,fp32-unfused"]))
    assert [r["variant"] for r in rows] == ["fp32", "fp32-unfused"]
    assert seen["fp32-unfused"] == {k: "0" for k in bench.FUSED_KERNEL_SWITCHES}
    assert seen["fp32"]["POSTTRAIN_FUSED_MLA"] == "1" and os.environ["POSTTRAIN_FUSED_MLA"] == "1"
    assert all(os.environ.get(k) is None for k in bench.FUSED_KERNEL_SWITCHES if k != "POSTTRAIN_FUSED_MLA")
    # every switch the toolkit reads is in the list
    from posttrain import mla_attention, rms_norm, routed_experts, swiglu

    assert set(bench.FUSED_KERNEL_SWITCHES) == {rms_norm.FUSED_RMS_NORM_ENV, routed_experts.FUSED_ROUTING_ENV,
                                                mla_attention.FUSED_MLA_ENV, swiglu.FUSED_SWIGLU_ENV}
