"""Host time of one FP8Linear forward+backward on the CUDA code path, against bf16 ``nn.Linear``, on any machine
(issue #13).

On an H100 the thin FP8 layers are launch-bound: session 11 measured kv_a's forward+backward at 1.15 ms against
about 0.4 ms of kernels, and bf16 ``nn.Linear`` takes 0.16 ms. Whatever Python and torch's dispatcher spend per
call is time the GPU waits once the kernels are short. This measures that host time without a GPU:

* FP8: the Hopper code path (``F.scaled_mm`` with block scales, the Triton quantizers, the per-step weight
  cache), with every device kernel replaced by a stub that only allocates its outputs. The first call runs the
  real kernels (Triton's interpreter, the tests' contract-checking ``F.scaled_mm``), so that every start-up check
  passes as on a GPU; the timed calls then measure the Python around the kernels.
* bf16: ``nn.Linear`` forward+backward on the meta device (torch's dispatch and autograd, no arithmetic).

Both run in this process, alternating; each figure is the median over ``--repeats`` rounds of ``--calls`` calls.
What it leaves out on a GPU: each kernel's launch (Triton's launcher, cuBLAS's heuristics), the same count for
both sides but more of them on the FP8 side. The machine's Python speed sets the scale; compare the ratio.

    python benchmarks/bench_fp8_host.py                        # 128 x 512 -> 384 and kv_a's 128 x 7168 -> 576
    python benchmarks/bench_fp8_host.py --linear 4096 7168 1536 --json host.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported: the warm-up call runs the real kernels
os.environ["POSTTRAIN_FP8_QUANT"] = "triton"
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


STUB_CALLS = {"F.scaled_mm": 0, "triton kernels": 0}  # calls of the stubs: the timed steps took the fast path


def _no_launch(*args, **kwargs) -> None:
    STUB_CALLS["triton kernels"] += 1


class _NoLaunch:
    """A Triton kernel that launches nothing: ``kernel[grid](*args)`` returns at once."""

    def __getitem__(self, grid):
        return _no_launch


def _output_of_scaled_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, *args, output_dtype=torch.bfloat16, **kwargs):
    STUB_CALLS["F.scaled_mm"] += 1
    return torch.empty(mat_a.shape[0], mat_b.shape[1], dtype=output_dtype, device=mat_a.device)


def simulate_cuda_path() -> None:
    """posttrain.fp8 through its Hopper fast path, with the tests' contract-checking ``F.scaled_mm``."""
    from fp8_torch_contract import FakeScaledMM

    from posttrain.fp8 import gemm

    gemm._fast_path_available = lambda device: True
    F.scaled_mm = FakeScaledMM()


def stub_kernels() -> None:
    """Every Triton quantizer and ``F.scaled_mm`` allocate their outputs and compute nothing."""
    from posttrain.fp8 import triton_quant

    for name, value in vars(triton_quant).copy().items():
        if type(value).__name__ in ("JITFunction", "InterpretedFunction"):
            setattr(triton_quant, name, _NoLaunch())
    F.scaled_mm = _output_of_scaled_mm


def fp8_step(m: int, k: int, n: int):
    from posttrain.fp8.linear import fp8_linear

    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(n, k, dtype=torch.bfloat16) / k**0.5)
    gy = torch.randn(m, n, dtype=torch.bfloat16)

    def step():
        x.grad = w.grad = None
        fp8_linear(x, w).backward(gy)
    return step


def bf16_step(m: int, k: int, n: int):
    linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="meta")
    x = torch.empty(m, k, dtype=torch.bfloat16, device="meta", requires_grad=True)
    gy = torch.empty(m, n, dtype=torch.bfloat16, device="meta")

    def step():
        x.grad = linear.weight.grad = None
        linear(x).backward(gy)
    return step


def host_us(steps: dict, calls: int, repeats: int) -> dict[str, float]:
    """Median microseconds per call of each step, the rounds of the steps alternating."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(calls):
                step()
            times[name].append((time.perf_counter() - t) / calls * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--linear", type=int, nargs=3, action="append", metavar=("M", "K", "N"),
                   help="M tokens, K in, N out (repeatable; default 128 512 384 and 128 7168 576)")
    p.add_argument("--calls", type=int, default=200, help="calls per round (default 200)")
    p.add_argument("--repeats", type=int, default=7, help="rounds; the median is reported (default 7)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    simulate_cuda_path()
    shapes = args.linear or [(128, 512, 384), (128, 7168, 576)]
    cases = [(f"{m} x {k} -> {n}", fp8_step(m, k, n), bf16_step(m, k, n)) for m, k, n in shapes]
    for _, fp8, bf16 in cases:  # the real kernels once: start-up checks, the weight cache, autograd's first call
        fp8()
        bf16()
    stub_kernels()
    rows = []
    print("| FP8Linear forward+backward | fp8 host us | bf16 nn.Linear host us | fp8/bf16 | per fp8 call: F.scaled_mm, Triton launches |")
    print("|---|---|---|---|---|")
    for name, fp8, bf16 in cases:
        before = dict(STUB_CALLS)
        got = host_us({"fp8": fp8, "bf16": bf16}, args.calls, args.repeats)
        per_call = {k: (STUB_CALLS[k] - before[k]) / (args.calls * args.repeats) for k in STUB_CALLS}
        rows.append({"shape": name, "fp8_host_us": got["fp8"], "bf16_host_us": got["bf16"],
                     "ratio": got["fp8"] / got["bf16"], "stub_calls_per_step": per_call})
        print(f"| {name} | {got['fp8']:.1f} | {got['bf16']:.1f} | {got['fp8'] / got['bf16']:.2f} | "
              f"{per_call['F.scaled_mm']:g}, {per_call['triton kernels']:g} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
