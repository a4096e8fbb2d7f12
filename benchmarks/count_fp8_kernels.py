"""Device kernels per FP8 layer forward+backward on the CUDA code path, counted on any machine (issue #13).

Each layer runs once to fill the per-step FP8 weight cache, then once more while a dispatch mode counts every
aten op that would launch a kernel (views and allocations left out). The Triton quantizers run in Triton's
interpreter and torch's FP8 GEMMs are the contract-checking CPU stand-ins of ``tests/`` (each call one
kernel), so the code path is the one an H100 takes. This is what a GPU profile would list, without a GPU:
a change's effect on launches shows here. Times do not.

    python benchmarks/count_fp8_kernels.py                      # FP8Linear at 256 x 512 -> 384 and kv_a's shape
    python benchmarks/count_fp8_kernels.py --linear 256 7168 576 --experts 8 512 256 384
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported
os.environ["POSTTRAIN_FP8_QUANT"] = "triton"
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from kernel_counter import KernelCounter  # noqa: E402


def simulate_cuda_path(counter: KernelCounter) -> None:
    """Route posttrain.fp8 through the Hopper fast paths with the tests' contract-checking stand-ins."""
    import test_fp8_experts_grouped as grouped_tests
    from fp8_torch_contract import FakeScaledGroupedMM, FakeScaledMM

    from posttrain.fp8 import experts, gemm, triton_quant

    gemm._fast_path_available = lambda device: True
    experts._grouped_fast_path_available = lambda device: True
    os.environ[experts.WGRAD_ENV] = "fp8"
    F.scaled_mm = counter.wrap("F.scaled_mm", FakeScaledMM())
    F.scaled_grouped_mm = counter.wrap("F.scaled_grouped_mm", FakeScaledGroupedMM())
    torch._scaled_grouped_mm = counter.wrap("torch._scaled_grouped_mm", grouped_tests.MetaCheckedWgrad())
    for name in ("quantize", "quantize_both", "quantize_token_runs"):
        if hasattr(triton_quant, name):  # (quantize_both is new in session 14; older code can be counted too)
            setattr(triton_quant, name, counter.wrap("triton " + name, getattr(triton_quant, name)))


def count(counter: KernelCounter, step) -> collections.Counter:
    step()  # fills the weight cache: what one optimizer step's later micro-steps see
    counter.clear()
    with counter:
        step()
    return collections.Counter(counter.counts)


def linear_step(m: int, k: int, n: int):
    from posttrain.fp8.linear import fp8_linear

    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(n, k, dtype=torch.bfloat16) / k**0.5)
    gy = torch.randn(m, n, dtype=torch.bfloat16)

    def step():
        x.grad = w.grad = None  # no gradient accumulation kernels
        fp8_linear(x, w).backward(gy)
    return step


def experts_step(e: int, s: int, k: int, n: int):
    from posttrain.fp8.experts import fp8_grouped_linear
    from posttrain.fp8.linear import FP8Recipe

    counts = torch.bincount(torch.randint(0, e, (s,), generator=torch.Generator().manual_seed(0)), minlength=e)
    x = torch.randn(s, k, dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(e, n, k, dtype=torch.bfloat16) / k**0.5)
    gy = torch.randn(s, n, dtype=torch.bfloat16)

    def step():
        x.grad = w.grad = None
        fp8_grouped_linear(x, w, counts, FP8Recipe(grouped="rowwise")).backward(gy)
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--linear", type=int, nargs=3, action="append", metavar=("M", "K", "N"),
                   help="an FP8Linear: M tokens, K in, N out (repeatable; default 256 512 384 and 256 7168 576)")
    p.add_argument("--experts", type=int, nargs=4, action="append", metavar=("E", "S", "K", "N"),
                   help="rowwise grouped experts: E experts, S routed tokens, K in, N out (repeatable; default 8 512 256 384)")
    p.add_argument("--json", help="also write {layer: {kernel: count}} to this file")
    args = p.parse_args(argv)
    counter = KernelCounter()
    simulate_cuda_path(counter)
    torch.manual_seed(0)
    cases = [(f"FP8Linear {m} x {k} -> {n}", linear_step(m, k, n)) for m, k, n in args.linear or [(256, 512, 384), (256, 7168, 576)]]
    cases += [(f"FP8 rowwise experts E={e}, {s} routed tokens, {k} -> {n}", experts_step(e, s, k, n))
              for e, s, k, n in args.experts or [(8, 512, 256, 384)]]
    print("| layer, one forward+backward (weight cached) | device kernels | of which |")
    print("|---|---|---|")
    results = {}
    for name, step in cases:
        got = results[name] = count(counter, step)
        detail = ", ".join(f"{key} {v}" for key, v in sorted(got.items()))
        print(f"| {name} | {sum(got.values())} | {detail} |")
    if args.json:
        Path(args.json).write_text(json.dumps({name: dict(c) for name, c in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
