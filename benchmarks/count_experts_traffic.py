"""Kernels and memory traffic of one routed-experts layer forward+backward on the CUDA code path, counted on any
machine (issue #13): transformers' `grouped_mm` experts against `posttrain_grouped` (posttrain/routed_experts.py).

Both run on CPU tensors in bf16. `posttrain_grouped` takes its CUDA path: its Triton dispatch/combine kernels run
in Triton's interpreter, each counted as one kernel moving its operands once (kernel_counter.py). The grouped
GEMMs are the same in both and are counted apart; the table's bytes are everything else. This is what a GPU
profile's memory traffic would show, without a GPU; times are not measured here.

    python benchmarks/count_experts_traffic.py        # Moonlight-16B's layer: 64 experts top-6, 2048 -> 1408, 4096 tokens
    python benchmarks/count_experts_traffic.py --tokens 256 --hidden 256 --inter 128 --experts 8 --top-k 6
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402
from kernel_counter import KernelCounter, report_kernels_by_name, tensor_bytes  # noqa: E402

from posttrain import routed_experts as R  # noqa: E402
from posttrain import swiglu as S  # noqa: E402


def simulate_cuda_path(counter: KernelCounter) -> None:
    """posttrain.routed_experts on CPU tensors as on CUDA, each Triton launch counted with its operands' bytes
    (each read or written once)."""
    R.FUSED_DEVICE_TYPES = ("cuda", "cpu")
    forward, backward = R.sum_rows, R.sum_rows_backward
    R.sum_rows = counter.wrap("triton sum_rows", forward, lambda out, *a, **k: tensor_bytes(out, a[:3]))

    def backward_bytes(out, dy, rows, slots, weights, need_dw=True):
        d_rows, dw = out
        return tensor_bytes(dy, slots, weights, d_rows) + (tensor_bytes(rows, dw) if need_dw else 0)

    R.sum_rows_backward = counter.wrap("triton sum_rows_backward", backward, backward_bytes)
    S.swiglu_forward = counter.wrap("triton swiglu_forward", S.swiglu_forward,
                                    lambda out, gate, up: tensor_bytes(out, gate, up))
    S.swiglu_backward = counter.wrap("triton swiglu_backward", S.swiglu_backward,
                                     lambda out, dy, gate, up, *_: tensor_bytes(out, dy, gate, up))


def experts_layer(args):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    torch.manual_seed(0)
    cfg = DeepseekV3Config(hidden_size=args.hidden, moe_intermediate_size=args.inter, n_routed_experts=args.experts,
                           num_experts_per_tok=args.top_k, n_group=1, topk_group=1)
    mod = DeepseekV3Experts(cfg)
    with torch.no_grad():
        mod.gate_up_proj.normal_(0, args.hidden**-0.5)
        mod.down_proj.normal_(0, args.inter**-0.5)
    mod = mod.bfloat16()
    x = torch.randn(args.tokens, args.hidden, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.rand(args.tokens, args.experts).topk(args.top_k, dim=-1).indices
    wts = torch.rand(args.tokens, args.top_k)  # the router's gating values are fp32
    wts = (wts / wts.sum(-1, keepdim=True)).requires_grad_(True)
    gy = torch.randn(args.tokens, args.hidden, dtype=torch.bfloat16)
    return mod, x, idx, wts, gy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408, help="expert width (moe_intermediate_size)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    from transformers.integrations.moe import grouped_mm_experts_forward

    counter = KernelCounter()
    simulate_cuda_path(counter)
    mod, x, idx, wts, gy = experts_layer(args)
    assert R.fused_routing_usable(x), R._checked  # the start-up check runs here, not in the counts
    routed = args.tokens * args.top_k * args.hidden
    rows, outputs = [], {}
    for name, forward in (("grouped_mm (transformers)", grouped_mm_experts_forward),
                          ("posttrain_grouped", R.fused_grouped_experts_forward)):
        x.grad = wts.grad = mod.gate_up_proj.grad = mod.down_proj.grad = None
        counter.clear()
        with counter:
            y = forward(mod, x, idx, wts)
            y.backward(gy)
        split = counter.split()
        outputs[name] = (y.detach().float(), x.grad.float(), wts.grad.float())
        rows.append({"impl": name, **split, "glue bytes per routed element": split["glue bytes"] / routed,
                     "kernels by name": dict(counter.counts)})
    base = outputs["grouped_mm (transformers)"]
    for (label, a), b in zip(zip(("y", "d hidden", "d gating values"), outputs["posttrain_grouped"]), base):
        rows[1][f"rel diff {label}"] = float((a - b).norm() / b.norm())
    print(f"Routed experts forward+backward, bf16: {args.tokens} tokens, {args.experts} experts top-{args.top_k}, "
          f"{args.hidden} -> {args.inter}; {routed / 1e6:.1f} M routed elements (tokens x top-k x hidden)\n")
    print("| impl | kernels (not GEMMs) | grouped GEMM kernels | bytes outside the GEMMs | per routed element |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['kernels']} | {r['gemm kernels']} | {r['glue bytes'] / 1e9:.2f} GB | "
              f"{r['glue bytes per routed element']:.1f} B |")
    print("\n" + "; ".join(f"{k} {v:.1e}" for k, v in rows[1].items() if k.startswith("rel diff")))
    report_kernels_by_name(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
