"""SFT training-step benchmark on one GPU (issue 13, item 6): tokens/s, peak memory, MFU.

Model: the Moonlight-16B-A3B shape (`posttrain.presets` 'moonlight-16b': hidden 2048, MLA with
kv_lora 512, 64 routed + 2 shared experts of 1408, top-6, vocabulary 163840) cut to `--layers` main
layers (the first one dense) plus one MTP module (report §2.2), built as
`posttrain.modeling.DeepseekV3ForCausalLMWithMTP` with random weights.

Step: what `DeepseekV3SFTTrainer.compute_loss` and the Trainer's optimizer step do, written out —
`ExpertLoadBalancer.batch` scope (token mask + packed sample ids; γ = 1e-3, α = 1e-4), forward with
the MTP module and the chunked LM head + cross-entropy (`return_logits=False`, the trainer's
default), loss = lm + 0.3·mtp + balance, backward, `clip_grad_norm_(1.0)`, AdamW (fused on CUDA),
`zero_grad`, `balancer.step()`. One packed row per step (padding-free): samples of uniform random
length in [256, 2048] (`--sample-lengths`; as in the H100 report's measurement), positions restarting
at 0 per sample, each sample's first label masked. The attention kernel is the trainer's default for the device (`flex_attention` on CUDA,
`sdpa_segmented` on CPU) unless `--attn` says otherwise.

Row widths vary from step to step as packed rows do (`--width-jitter`, default up to 15 tokens
short of the row length): a kernel that re-plans per shape (cuDNN SDPA: 3-5 s per new width on an
H100) shows up as a stall. After `--warmup` steps, a step slower than 2× the median is reported as
a stall (`stall_free`).

MFU = (6·N_act·T + A) / t / peak, per step, with
  T      real tokens of the step (the packed row; a pad segment, as fp8 rows on CUDA get, is not counted);
  N_act  matmul weights one token runs through: every ≥2-D weight except the input embedding, the
         routed experts at top_k/E of theirs, and `lm_head` once more per MTP depth (the MTP module
         shares it);
  A      attention FLOPs actually needed: 3 · Σ_layers Σ_samples h · n² · (d_qk + d_v) (causal
         forward h·n²·(d_qk+d_v), backward twice that), MTP layer included;
  peak   dense bf16 peak of the card (H100/H200 SXM: 989 TF/s; `--peak-tflops` to override). FP8
         rows use the same bf16 peak.
"MFU body" drops both LM-head matmuls (`lm_head` × (1 + MTP depths)) from N_act.

    python benchmarks/bench_gpu_sft.py                       # H100: bf16 and fp8, rows of 8k and 32k
    python benchmarks/bench_gpu_sft.py --seqs 8192 --variants bf16 --json out.json
    python benchmarks/bench_gpu_sft.py --cpu-smoke           # tiny shapes on the CPU (the quick test)

`run_sft_step_bench(args)` returns the rows (one dict per variant × row length) for
`benchmarks/bench_gpu.py`; `parse_args([...])` builds `args`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from posttrain import mla_attention, rms_norm, routed_experts, swiglu  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), by device-name substring.
# dense bf16 peaks (NVIDIA datasheets), matched against the device name in this order: the PCIe and NVL
# cards run at lower clocks than the SXM ones that share their name's prefix
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H800 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
STALL_FACTOR = 2.0
VARIANTS = ("bf16", "fp32", "fp32-autocast", "fp32-master", "fp8")
UNFUSED = "-unfused"  # a variant with this suffix runs with the toolkit's fused glue kernels switched off
FUSED_KERNEL_SWITCHES = (rms_norm.FUSED_RMS_NORM_ENV, routed_experts.FUSED_ROUTING_ENV, mla_attention.FUSED_MLA_ENV,
                         swiglu.FUSED_SWIGLU_ENV)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny preset (vocabulary 1024) on the CPU, rows of 128 and 256 tokens, 1+3 steps, variants fp32,fp8")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--preset", default="moonlight-16b")
    ap.add_argument("--layers", type=int, default=4, help="main decoder layers (the first is dense); + 1 MTP module")
    ap.add_argument("--mtp-layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=None, help="default: the preset's (163840 for moonlight-16b)")
    ap.add_argument("--seqs", default="8192,32768", help="packed row lengths, comma-separated")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated of {', '.join(VARIANTS)} (default: bf16,fp8,fp32-master on CUDA; fp32,fp8 on CPU). "
                    "bf16 / fp32: weights in that dtype; fp32-autocast: fp32 master weights + bf16 autocast; "
                    "fp32-master: fp32 master weights, bf16 compute through FSDP2's MixedPrecisionPolicy on one rank "
                    "(recipes/accelerate/fsdp2-1gpu.yaml); "
                    "fp8: `fp8: true` layers (swap_linears_to_fp8) over bf16 weights (fp32 on CPU). "
                    f"Any of them with the suffix {UNFUSED} (e.g. bf16{UNFUSED}) runs with the fused RMSNorm, MoE routing, "
                    "MLA assembly and SwiGLU kernels switched off (transformers' eager ops): their A/B in one process")
    ap.add_argument("--fp8-backward", default="fp8", choices=["fp8", "bf16"])
    ap.add_argument("--attn", default=None, help="attn_implementation (default: the SFT trainer's for the device)")
    ap.add_argument("--lm-loss", default="auto", choices=["auto", "fused", "recompute", "trl"],
                    help="LM head + cross-entropy (posttrain.lm_loss.lm_head_cross_entropy backend; auto: fused on "
                         "CUDA, recompute on CPU)")
    ap.add_argument("--compile-layers", action="store_true",
                    help="accelerate's regional compilation (torch.compile of each decoder block; an experiment: the "
                         "first steps compile, --warmup must cover them)")
    ap.add_argument("--experts", default="posttrain_grouped",
                    help="experts implementation of the non-FP8 variants: posttrain_grouped (the toolkit's default: "
                         "transformers' grouped_mm with fused dispatch/combine kernels on CUDA), grouped_mm "
                         "(transformers' own), eager, ...")
    ap.add_argument("--grad-ckpt", default="auto", choices=["auto", "on", "off"],
                    help="activation checkpointing; auto: on for rows longer than 16384 tokens")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (flex compiles, dynamic-shape recompile)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps")
    ap.add_argument("--width-jitter", type=int, default=15,
                    help="each step's row is up to this many tokens shorter than the row length (0: fixed width)")
    ap.add_argument("--pad-to-multiple-of", default="auto",
                    help="pad each row to a multiple of this many tokens (a pad segment, as the SFT trainer's collator "
                         "does); auto: what the trainer does, i.e. 128 for fp8 on CUDA "
                         "(posttrain.fp8.training.fp8_row_multiple), none otherwise; 0: never")
    ap.add_argument("--sample-lengths", default="256,2048",
                    help="packed samples' lengths, uniform in LO,HI (capped at row/32, row/4 for short rows)")
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after the timed steps, run --profile-steps more under torch.profiler: print the top "
                         "operators by self device time and write a Chrome trace per row to DIR")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--json", default=None,
                    help="write {environment, args, rows} here (default: $OUT/bench_gpu_sft.json when $OUT is set)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.device = args.device or "cpu"
        args.preset, args.layers, args.vocab = "tiny", 2, args.vocab or 1024
        if args.seqs == "8192,32768":
            args.seqs = "128,256"
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 3)
    return args


# ---------------------------------------------------------------------------------------------
# model, batches, FLOPs


def build_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP
    from posttrain.presets import preset_config

    over: dict[str, Any] = {"num_hidden_layers": args.layers, "num_nextn_predict_layers": args.mtp_layers}
    if args.vocab:
        over["vocab_size"] = args.vocab
    cfg = preset_config(args.preset, **over)
    torch.manual_seed(args.seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DeepseekV3ForCausalLMWithMTP(cfg)
    finally:
        torch.set_default_dtype(prev)
    for module in model.modules():  # the router's correction bias is an fp32 buffer in checkpoints
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            module.e_score_correction_bias = bias.float()
    return model.train()


def flop_params(model) -> dict[str, float]:
    """N_act (see the module docstring) and its parts, from the model's own parameters."""
    cfg = model.config
    n_mtp = len(model.mtp_layers)
    embed = model.model.embed_tokens.weight
    lm_head = model.lm_head.weight.numel()
    act = routed = 0.0
    for name, p in model.named_parameters():
        if p.dim() < 2 or p is embed:
            continue
        if ".mlp.experts." in name:  # routed experts (fused [E, ...] tensors)
            routed += p.numel()
            act += p.numel() * cfg.num_experts_per_tok / cfg.n_routed_experts
        else:
            act += p.numel()
    act += lm_head * n_mtp  # the shared output head runs again per MTP depth
    return {"n_act": act, "n_act_body": act - lm_head * (1 + n_mtp), "lm_head": float(lm_head),
            "routed_expert_params": routed, "total_params": float(sum(p.numel() for p in model.parameters()))}


def attention_flops(model, lengths: list[int]) -> float:
    cfg = model.config
    d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    n_layers = cfg.num_hidden_layers + len(model.mtp_layers)
    return 3.0 * n_layers * sum(cfg.num_attention_heads * n * n * (d_qk + cfg.v_head_dim) for n in lengths)


def make_batch(seq: int, vocab: int, gen: torch.Generator, jitter: int,
               sample_lengths: tuple[int, int] = (256, 2048), pad_to: int | None = None,
               ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One padding-free packed row of `seq - r` tokens (r uniform in [0, jitter]) of samples with
    lengths uniform in `sample_lengths` (capped at [seq/32, seq/4] for short rows). With `pad_to`, a pad
    segment fills the row to a multiple of it, as PackedCollator does: its own positions from 0, never a
    target, outside `token_mask`. The returned lengths are the real samples'."""
    width = seq - int(torch.randint(0, jitter + 1, (1,), generator=gen)) if jitter > 0 else seq
    lo, hi = max(2, min(sample_lengths[0], seq // 32)), max(3, min(sample_lengths[1], seq // 4))
    lengths: list[int] = []
    while sum(lengths) < width:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - width
    if lengths[-1] < 2 and len(lengths) > 1:
        last = lengths.pop()  # (not `lengths[-2] += lengths.pop()`: the target index is taken first)
        lengths[-1] += last
    pad = (-width) % pad_to if pad_to else 0
    ids = torch.randint(0, vocab, (1, width + pad), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths + ([pad] if pad else [])]).unsqueeze(0)
    labels = ids.clone()
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[0, starts] = -100  # a sample's first token is never a target (PackedCollator)
    labels[0, width:] = -100
    token_mask = torch.zeros(1, width + pad, dtype=torch.bool)
    token_mask[0, :width] = True
    from posttrain.modeling import sample_ids_from_positions

    batch = {"input_ids": ids, "labels": labels, "position_ids": pos,
             "token_mask": token_mask, "sample_ids": sample_ids_from_positions(pos)}
    return batch, lengths


# ---------------------------------------------------------------------------------------------
# the step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # on the CPU no peak is measured, and a collection walks every live object
        gc.collect()
        torch.cuda.empty_cache()


def _peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process-lifetime peak (Linux: KiB)
    except ImportError:  # pragma: no cover
        return None


def _peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return float(args.peak_tflops)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value
    return None


def _variant_setup(variant: str, device: torch.device) -> tuple[torch.dtype, bool, bool]:
    """(weight dtype, bf16 autocast, fp8 layers)."""
    variant = variant.removesuffix(UNFUSED)
    if variant == "bf16":
        return torch.bfloat16, False, False
    if variant in ("fp32", "fp32-master"):
        return torch.float32, False, False
    if variant == "fp32-autocast":
        return torch.float32, True, False
    if variant == "fp8":
        return (torch.bfloat16 if device.type == "cuda" else torch.float32), False, True
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}, each optionally with {UNFUSED}")


@contextlib.contextmanager
def _one_rank_group(device: torch.device):
    """A torch.distributed group of one process (FSDP2 needs one), torn down after the row if made here."""
    import socket

    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                world_size=1, rank=0)
    try:
        yield
    finally:
        if made:
            dist.destroy_process_group()


def _fsdp2_mixed_precision(model, device: torch.device) -> None:
    """FSDP2 on one rank with bf16 compute over the fp32 master weights, as accelerate builds it from
    recipes/accelerate/fsdp2-1gpu.yaml: each decoder layer and the MTP module a unit, then the root; the
    bf16 copies of a unit's weights are made once per step and kept from forward to backward (one rank has
    no memory to win by resharding); gradients reduced into the fp32 master weights. The mesh is on ``device``:
    FSDP2's default mesh takes the build's accelerator, which would move a --cpu-smoke run onto a visible GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = init_device_mesh(device.type, (1,))
    blocks = {id(b): b for b in [*model.model.layers, *model.mtp_layers]}  # the MTP module may be a layers entry
    for block in blocks.values():
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def run_variant(args: argparse.Namespace, variant: str, seq: int, device: torch.device) -> dict[str, Any]:
    # an -unfused variant: every fused-kernel switch "0" for its row, the environment restored after
    switched_off = {k: "0" for k in FUSED_KERNEL_SWITCHES} if variant.endswith(UNFUSED) else {}
    with mock.patch.dict(os.environ, switched_off):
        if variant.removesuffix(UNFUSED) != "fp32-master":
            return _run_variant(args, variant, seq, device)
        with _one_rank_group(device):
            return _run_variant(args, variant, seq, device)


def _run_variant(args: argparse.Namespace, variant: str, seq: int, device: torch.device) -> dict[str, Any]:
    from posttrain.balancing import ExpertLoadBalancer
    from posttrain.sft.attention import default_attn_implementation, register_segmented_sdpa

    dtype, autocast, fp8 = _variant_setup(variant, device)
    attn = args.attn or default_attn_implementation(device.type)
    ckpt = args.grad_ckpt == "on" or (args.grad_ckpt == "auto" and seq > 16384)
    if args.pad_to_multiple_of == "auto":
        from posttrain.fp8.training import fp8_row_multiple

        pad_to = fp8_row_multiple(device.type) if fp8 else None
    else:
        pad_to = int(args.pad_to_multiple_of) or None
    row: dict[str, Any] = {"variant": variant, "seq": seq, "attn": attn, "grad_ckpt": ckpt,
                           "weights": str(dtype).replace("torch.", ""), "autocast_bf16": autocast, "fp8": fp8,
                           "pad_to_multiple_of": pad_to, "lm_loss": args.lm_loss}
    if attn == "sdpa_segmented":
        register_segmented_sdpa()
    model = build_model(args, dtype, device)
    model.set_attn_implementation(attn)
    model.set_experts_implementation(args.experts)
    counts = flop_params(model)  # before any FP8 swap (same weights, other modules)
    if fp8:
        from posttrain.fp8.linear import FP8Recipe, swap_linears_to_fp8

        row["fp8_modules"] = len(swap_linears_to_fp8(model, recipe=FP8Recipe(backward=args.fp8_backward)))
        row["fp8_backward"] = args.fp8_backward
    row["experts"] = model.config._experts_implementation
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile_layers:
        # accelerate's regional compilation (what `torch_compile: true` with
        # ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=true gives a Trainer): each decoder block, the MTP block
        # included, and the other leaves compiled on their own; dynamic row widths
        from accelerate.utils import compile_regions

        from engines.compat import apply_training_patches

        apply_training_patches()  # as the trainers do: the router hooks trace into checkpointed blocks too
        model = compile_regions(model, dynamic=True)
    row["compile_layers"] = bool(args.compile_layers)
    dynamo_before = _dynamo_counts()
    if variant.removesuffix(UNFUSED) == "fp32-master":
        _fsdp2_mixed_precision(model, device)
        row["compute"] = "bfloat16 (FSDP2 MixedPrecisionPolicy)"
    row["param_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")
    balancer = ExpertLoadBalancer(model, bias_update_speed=1e-3, seq_balance_alpha=1e-4, history_interval=0)
    gen = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.warmup + args.iters):
        batch, lengths = make_batch(seq, model.config.vocab_size, gen, args.width_jitter,
                                    tuple(int(x) for x in args.sample_lengths.split(",")), pad_to)
        batches.append(({k: v.to(device) for k, v in batch.items()}, lengths))

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with balancer.batch(token_mask=batch["token_mask"], sample_ids=batch["sample_ids"]), ctx:
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        use_cache=False, compute_mtp=True, return_logits=False, lm_loss_backend=args.lm_loss)
            loss = out.loss + args.mtp_weight * out.mtp_loss
            balance = balancer.sequence_balance_loss()
            if balance is not None:
                loss = loss + balance
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balancer.step()
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for batch, _ in batches:
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step(batch))
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = _peak_bytes(device)
    if args.compile_layers:  # what Dynamo made of the steps: every graph break splits a block's graph
        row["dynamo_graph_breaks"], row["dynamo_graphs"], row["dynamo_backend_failures"] = (
            a - b for a, b in zip(_dynamo_counts(), dynamo_before))
    row["host_syncs_per_step"] = _count_host_syncs(step, batches[-1][0], device)
    if args.profile:
        row["profile"] = _profile(step, [b for b, _ in batches[-args.profile_steps:]], device,
                                  Path(args.profile) / f"trace-{variant}-{seq}.json")
    timed, timed_batches = times[args.warmup:], batches[args.warmup:]
    tokens = [sum(lengths) for _, lengths in timed_batches]  # real tokens: a pad segment is work, not throughput
    median = statistics.median(timed)
    peak_tf = _peak_tflops(args, device)
    flops = [6.0 * counts["n_act"] * n + attention_flops(model, lengths) for n, (_, lengths) in zip(tokens, timed_batches)]
    flops_body = [6.0 * counts["n_act_body"] * n + attention_flops(model, lengths)
                  for n, (_, lengths) in zip(tokens, timed_batches)]
    total_t = sum(timed)
    row.update({
        "steps": len(timed),
        "warmup_s": [round(t, 3) for t in times[:args.warmup]],
        "step_s": [round(t, 4) for t in timed],
        "step_ms_median": 1e3 * median,
        "tokens_per_s": sum(tokens) / total_t,
        "tokens_per_step": statistics.mean(tokens),
        "widths": sorted({n for n in tokens}),
        "padded_widths": sorted({b["input_ids"].shape[1] for b, _ in timed_batches}),
        "max_over_median": max(timed) / median,
        "stall_free": max(timed) <= STALL_FACTOR * median,
        "peak_mem_gib": peak / 2**30 if peak is not None else None,
        "peak_mem_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "model_tflops_per_s": sum(flops) / total_t / 1e12,
        "mfu_total": sum(flops) / total_t / (peak_tf * 1e12) if peak_tf else None,
        "mfu_body": sum(flops_body) / total_t / (peak_tf * 1e12) if peak_tf else None,
        "peak_tflops": peak_tf,
        "attn_flop_share": sum(attention_flops(model, lengths) for _, lengths in timed_batches) / sum(flops),
        "n_act": counts["n_act"], "n_act_body": counts["n_act_body"], "total_params": counts["total_params"],
        "losses": [round(float(x), 4) for x in losses],
    })
    del model, opt, balancer, batches
    return row


def _dynamo_counts() -> tuple[int, int, int]:
    """(graph breaks, graphs compiled, graphs the backend failed to compile) so far in this process, from
    torch._dynamo's counters. A backend failure (e.g. transformers' CPU `grouped_mm` fallback, whose
    backward reads its offsets on the host) also ends in a graph break, which Dynamo does not count as one."""
    from torch._dynamo.utils import counters

    return (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"],
            counters["aot_autograd"]["not_ok"])


def _count_host_syncs(step, batch: dict[str, torch.Tensor], device: torch.device) -> int | None:
    """Operations in one step that make the host wait for the GPU (torch's sync debug mode warns once per
    call): per-layer syncs show up as a count that grows with the layers. None off CUDA."""
    import warnings

    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def _profile(step, batches: list[dict[str, torch.Tensor]], device: torch.device, trace: Path) -> str:
    """torch.profiler over ``batches`` (one step each): the top operators by self time on the device (the
    CPU off CUDA), as printed; the Chrome trace goes to ``trace``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        _sync(device)
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    print(f"\n### profile: {trace.name} ({len(batches)} steps)\n{table}", flush=True)
    return table


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "machine": platform.machine(),
                           "cpu": platform.processor() or platform.machine(), "device": str(device)}
    try:
        import trl

        env["trl"] = trl.__version__
    except ImportError:
        env["trl"] = None
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_mem_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def raise_on_sigterm() -> None:
    """SIGTERM (``timeout``, as gpu_session.sh stops a part) raises KeyboardInterrupt, so that the rows measured
    so far are still printed and written instead of lost with the process."""
    import signal

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)


def run_sft_step_bench(args: argparse.Namespace, rows: list | None = None) -> list[dict[str, Any]]:
    """One row per (variant, row length): see the module docstring. Failures (out of memory, a
    kernel error) become rows with an `error` and the others still run. Each row is appended to ``rows`` (a
    caller's list, which keeps them if the run is stopped) and printed as a table line as soon as it is measured."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = (args.variants or ("bf16,fp8,fp32-master" if device.type == "cuda" else "fp32,fp8")).split(",")
    rows = [] if rows is None else rows
    for variant in variants:
        for seq in (int(s) for s in str(args.seqs).split(",")):
            try:
                rows.append(run_variant(args, variant.strip(), seq, device))
            except Exception as e:  # noqa: BLE001 - a row per failure, the table goes on
                if isinstance(e, ValueError) and "unknown variant" in str(e):
                    raise
                traceback.print_exc()
                rows.append({"variant": variant, "seq": seq, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            _print_row(rows[-1])
            _free(device)
    return rows


def _print_row(row: dict[str, Any]) -> None:
    """A measured row's table line, at once (a run stopped later keeps it in the log); JSON if it lacks a field."""
    try:
        line = format_table([row]).splitlines()[-1]
    except (KeyError, TypeError):  # printing must not cost the run its next rows
        line = json.dumps(row, default=str)
    print("row: " + line, flush=True)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("| variant | row tokens | attn | ckpt | row pad | step ms (median) | tokens/s | peak GiB | MFU total "
            "| MFU body | max/median | stalls | host syncs/step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def pct(x):
        return f"{100 * x:.1f}%" if x is not None else "n/a"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['seq']} | | | | {r['error']} | | | | | | | |")
            continue
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(
            f"| {r['variant']}{' compiled' if r.get('compile_layers') else ''}{'' if r.get('lm_loss', 'auto') == 'auto' else ' ' + r['lm_loss']} "
            f"| {r['seq']} | {r['attn']} | {'on' if r['grad_ckpt'] else 'off'} | "
            f"{r.get('pad_to_multiple_of') or '-'} | "
            f"{r['step_ms_median']:.1f} | {r['tokens_per_s']:.0f} | {peak} | {pct(r['mfu_total'])} | "
            f"{pct(r['mfu_body'])} | {r['max_over_median']:.2f} | {'none' if r['stall_free'] else 'STALL'} | "
            f"{r['host_syncs_per_step'] if r['host_syncs_per_step'] is not None else 'n/a'} |")
    for r in rows:
        if "dynamo_graphs" in r:
            lines.append(f"{r['variant']} compiled, {r['seq']}-token rows: {r['dynamo_graphs']} graphs compiled, "
                         f"{r['dynamo_graph_breaks']} graph breaks, {r['dynamo_backend_failures']} graphs the "
                         "backend could not compile (each a break too)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device)
    print(json.dumps(env))
    raise_on_sigterm()
    rows: list[dict[str, Any]] = []
    interrupted = False
    try:
        run_sft_step_bench(args, rows)
    except KeyboardInterrupt:  # `timeout` or Ctrl-C: the rows measured so far are still printed and written
        interrupted = True
        print(f"stopped: {len(rows)} rows measured")
    print(format_table(rows))
    print("MFU = (6·N_act·T + 3·Σ_layers Σ_samples h·n²·(d_qk+d_v)) / t / peak; body: N_act without the LM heads")
    path = args.json or (os.path.join(os.environ["OUT"], "bench_gpu_sft.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows,
                                          "interrupted": interrupted}, indent=1))
        print(f"rows written to {path}")
    if interrupted:
        return 124
    return 0 if all("error" not in r and r["stall_free"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
