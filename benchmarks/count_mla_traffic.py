"""Kernels and memory traffic of one MLA attention layer forward+backward on the CUDA code path, counted on any
machine (issue #13): transformers' `DeepseekV3Attention` against `DeepseekV3FusedAttention`
(posttrain/mla_attention.py).

Both run on CPU tensors in bf16. The fused layer takes its CUDA path: its Triton kernels run in Triton's
interpreter, each counted as one kernel moving its operands once (kernel_counter.py). What both layers share is
counted as the GPU runs it: the attention call as one kernel each way that writes its output in the query's
layout, as flex_attention does, and the latent RMSNorms as torch's fused RMSNorm (posttrain/rms_norm.py), one
kernel each way. The GEMMs are the same in both and are counted apart; the
table's bytes are everything else: the query/key assembly, and the attention's and norms' operands. Times are not
measured here.

    python benchmarks/count_mla_traffic.py             # Moonlight-16B's attention: 16 heads, hidden 2048, no q LoRA
    python benchmarks/count_mla_traffic.py --heads 128 --hidden 7168 --q-lora-rank 1536 --tokens 256   # V3's
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
import torch.nn.functional as F  # noqa: E402
from kernel_counter import KernelCounter, report_kernels_by_name, tensor_bytes  # noqa: E402
from transformers import AttentionInterface, DeepseekV3Config  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
)

from posttrain import mla_attention as M  # noqa: E402

COUNTED_ATTENTION = "counted_sdpa"


def simulate_cuda_path(counter: KernelCounter) -> None:
    """posttrain.mla_attention on CPU tensors as on CUDA, each Triton launch counted with its operands' bytes;
    the attention and the RMSNorms as the single kernels the GPU runs."""
    M.FUSED_DEVICE_TYPES = ("cuda", "cpu")

    def forward_bytes(out, q, kv, k_rope, cos, sin, num_heads, nope, v_dim):
        tokens = q.shape[0] * q.shape[1]
        return tensor_bytes(out, q, k_rope, cos, sin) + tokens * num_heads * nope * kv.element_size()  # kv: nope part

    M.query_key_forward = counter.wrap("triton query_key_forward", M.query_key_forward, forward_bytes)
    M.query_key_backward = counter.wrap("triton query_key_backward", M.query_key_backward,
                                        lambda out, *a, **k: tensor_bytes(out, a[:5]))

    class _Attention(torch.autograd.Function):  # SDPA, counted as one kernel each way, laid out as flex's
        @staticmethod
        def forward(ctx, q, k, v, scaling):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scaling)
            ctx.saved = leaves, out
            # flex_attention writes its output in the query's stride order (torch/_inductor/kernel/flex:
            # infer_dense_strides from the query), inside its kernel
            like_query = torch.empty_strided(out.shape, _dense_strides(out.shape, q), dtype=out.dtype)
            return like_query.copy_(out.detach())

        @staticmethod
        def backward(ctx, gy):
            leaves, out = ctx.saved
            return (*torch.autograd.grad(out, leaves, gy), None)

    attention_forward = counter.wrap("attention forward", _Attention.forward,
                                     lambda out, ctx, q, k, v, s: tensor_bytes(out, q, k, v))
    attention_backward = counter.wrap("attention backward", _Attention.backward,
                                      lambda out, ctx, gy: tensor_bytes(out, gy, ctx.saved))
    _Attention.forward = staticmethod(attention_forward)
    _Attention.backward = staticmethod(attention_backward)

    def counted_sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
        # what transformers' flex_attention_forward returns: [B, S, heads, dim], made contiguous
        return _Attention.apply(query, key, value, scaling).transpose(1, 2).contiguous(), None

    AttentionInterface.register(COUNTED_ATTENTION, counted_sdpa)

    class _Norm(torch.autograd.Function):  # torch's fused RMSNorm, one kernel each way
        @staticmethod
        def forward(ctx, x, w, eps):
            ctx.save_for_backward(x, w)
            ctx.eps = eps
            return F.rms_norm(x, (x.shape[-1],), w, eps)

        @staticmethod
        def backward(ctx, dy):
            x, w = ctx.saved_tensors
            with torch.enable_grad():
                xl, wl = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
                return (*torch.autograd.grad(F.rms_norm(xl, (x.shape[-1],), wl, ctx.eps), (xl, wl), dy), None)

    norm_forward = counter.wrap("fused rms_norm forward", _Norm.forward, lambda out, ctx, x, w, eps: tensor_bytes(out, x, w))
    norm_backward = counter.wrap("fused rms_norm backward", _Norm.backward,
                                 lambda out, ctx, dy: tensor_bytes(out, dy, ctx.saved_tensors))
    _Norm.forward = staticmethod(norm_forward)
    _Norm.backward = staticmethod(norm_backward)
    DeepseekV3RMSNorm.forward = lambda self, x: _Norm.apply(x, self.weight, self.variance_epsilon)


def _dense_strides(shape: torch.Size, like: torch.Tensor) -> list[int]:
    """Dense strides for ``shape`` in the stride order of ``like`` (largest stride outermost)."""
    order = sorted(range(len(shape)), key=lambda d: (like.stride(d), d))
    strides, step = [0] * len(shape), 1
    for d in order:
        strides[d] = step
        step *= shape[d]
    return strides


def attention_layer(args):
    torch.manual_seed(0)
    cfg = DeepseekV3Config(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                           q_lora_rank=args.q_lora_rank or None, kv_lora_rank=512, qk_rope_head_dim=64,
                           qk_nope_head_dim=128, v_head_dim=128, num_hidden_layers=1)
    cfg._attn_implementation = COUNTED_ATTENTION
    mod = DeepseekV3Attention(cfg, layer_idx=0)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, p.shape[1] ** -0.5) if p.dim() == 2 else p.fill_(1.0)
    mod = mod.bfloat16()
    x = torch.randn(1, args.tokens, args.hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(args.tokens).view(1, -1) % 1000  # packed samples of 1000 tokens
    pos = DeepseekV3RotaryEmbedding(cfg)(x, positions)
    gy = torch.randn(1, args.tokens, args.hidden, dtype=torch.bfloat16)
    return mod, x, pos, gy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens in the row (the counts scale with it)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--q-lora-rank", type=int, default=0, help="0: no query LoRA (q_proj), as Moonlight")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    counter = KernelCounter()
    simulate_cuda_path(counter)
    mod, x, pos, gy = attention_layer(args)
    assert M.fused_mla_usable(mod, x, pos, None), M._checked  # the start-up check runs here, not in the counts
    rows, outputs = [], {}
    for name, forward in (("transformers", DeepseekV3Attention.forward),
                          ("posttrain fused", M.DeepseekV3FusedAttention.forward)):
        mod.__class__ = DeepseekV3Attention if name == "transformers" else M.DeepseekV3FusedAttention
        x.grad = None
        mod.zero_grad()
        counter.clear()
        with counter:
            y, _ = forward(mod, x, pos, None)
            y.backward(gy)
        split = counter.split()
        outputs[name] = [y.detach().float(), x.grad.float()] + [q.grad.float() for _, q in sorted(mod.named_parameters())]
        shared = sum(v for k, v in counter.nbytes.items() if k.startswith(("attention", "fused rms_norm")))
        rows.append({"impl": name, **split, "attention and norm bytes": shared,
                     "assembly bytes per token": (split["glue bytes"] - shared) / args.tokens,
                     "kernels by name": dict(counter.counts)})
    names = ["y", "d x"] + [n for n, _ in sorted(mod.named_parameters())]
    rows[1]["max rel diff"] = max(float((a - b).norm() / b.norm()) for a, b in zip(outputs["posttrain fused"], outputs["transformers"]))
    rows[1]["rel diff by name"] = {n: float((a - b).norm() / b.norm())
                                   for n, a, b in zip(names, outputs["posttrain fused"], outputs["transformers"])}
    print(f"MLA attention forward+backward, bf16: {args.tokens} tokens, {args.heads} heads, hidden {args.hidden}, "
          f"q LoRA {args.q_lora_rank or 'none'}; the attention and the RMSNorms counted as single kernels each way\n")
    print("| impl | kernels (not GEMMs) | GEMM kernels | bytes outside the GEMMs | of which attention + norms "
          "| the rest per token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['kernels']} | {r['gemm kernels']} | {r['glue bytes'] / 1e6:.1f} MB | "
              f"{r['attention and norm bytes'] / 1e6:.1f} MB | {r['assembly bytes per token'] / 1e3:.1f} kB |")
    print(f"\nlargest relative difference (output and every gradient): {rows[1]['max rel diff']:.1e}")
    report_kernels_by_name(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
