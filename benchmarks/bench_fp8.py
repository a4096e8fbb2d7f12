"""FP8 benchmarks.

CPU (always): streaming conversion throughput and peak RSS against shard size, on synthetic
DeepSeek-layout checkpoints (each conversion in its own interpreter; peak = VmHWM minus the
VmHWM of an interpreter that only imported the converter), plus the cost of the FP8Linear
reference path against nn.Linear.

GPU (only when CUDA is available): FP8 block-scaled GEMM vs bf16 GEMM, and FP8Linear vs
nn.Linear forward+backward, for V3 shapes (expert 7168x2048, dense 7168x18432).

    python benchmarks/bench_fp8.py [--shard-mb 16 32 64] [--repeats 3] [--skip-gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_CHILD = """
import json, re, sys, time
from posttrain.fp8.convert import main
t = time.perf_counter()
if sys.argv[1] != "baseline":
    main(sys.argv[1:] + ["--no-progress"])
dt = time.perf_counter() - t
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"hwm": hwm, "seconds": dt}))
"""


def _child(*args: str) -> dict:
    # the repository first, the parent's path kept (the packages may live there, as on the lent GPU machine)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size(d: Path) -> tuple[int, int]:
    files = list(d.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)


def bench_conversion(shard_mbs: list[int], repeats: int, layers: int) -> list[dict]:
    from posttrain.fp8.synthetic import write_synthetic_checkpoint

    rows = []
    baseline = min(_child("baseline")["hwm"] for _ in range(2))
    for mb in shard_mbs:
        with tempfile.TemporaryDirectory(prefix="bench_fp8_") as tmp:
            tmp = Path(tmp)
            src = write_synthetic_checkpoint(
                tmp / "fp8", fp8=True, shard_bytes=mb << 20, num_layers=layers, hidden=2048,
                moe_intermediate=1024, n_experts=8,
            )  # fmt: skip
            chain = (("fp8-to-bf16", src, tmp / "bf16"), ("bf16-to-fp8", tmp / "bf16", tmp / "fp8again"))
            for direction, a, b in chain:
                runs = []
                for _ in range(repeats):
                    if b.exists():
                        import shutil

                        shutil.rmtree(b)
                    runs.append(_child(direction, str(a), str(b)))
                in_total, in_shard = _size(a)
                out_total, out_shard = _size(b)
                best = min(r["seconds"] for r in runs)
                peak = max(r["hwm"] for r in runs) - baseline
                rows.append(
                    dict(
                        direction=direction, shard_mb_in=in_shard / 2**20, shard_mb_out=out_shard / 2**20,
                        shards=len(list(a.glob("*.safetensors"))), total_mb_in=in_total / 2**20,
                        seconds=best, mb_per_s=in_total / 2**20 / best, peak_mb=peak / 2**20,
                        peak_over_in_plus_out=peak / (in_shard + out_shard),
                    )  # fmt: skip
                )
                print(_fmt_conv(rows[-1]), flush=True)
    return rows


def _fmt_conv(r: dict) -> str:
    return (
        f"| {r['direction']} | {r['shards']} | {r['shard_mb_in']:.0f} | {r['shard_mb_out']:.0f} | {r['total_mb_in']:.0f} "
        f"| {r['seconds']:.2f} | {r['mb_per_s']:.0f} | {r['peak_mb']:.0f} | {r['peak_over_in_plus_out']:.2f} |"
    )


def _time(fn, repeats: int = 5, cuda: bool = False) -> float:
    import torch

    fn()
    if cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench_cpu_layer(tokens: int = 1024, k: int = 1024, n: int = 1024) -> dict:
    import torch
    from torch import nn

    from posttrain.fp8.linear import FP8Linear

    torch.manual_seed(0)
    ref = nn.Linear(k, n, bias=False)
    fp8 = FP8Linear.from_linear(nn.Linear(k, n, bias=False))
    x = torch.randn(tokens, k, requires_grad=True)

    def step(layer):
        def run():
            layer.weight.grad = None
            x.grad = None
            layer(x).sum().backward()

        return run

    t_ref, t_fp8 = _time(step(ref)), _time(step(fp8))
    row = dict(shape=f"{tokens}x{k}->{n}", fp32_ms=t_ref * 1e3, fp8_reference_ms=t_fp8 * 1e3, ratio=t_fp8 / t_ref)
    print(f"| FP8Linear (reference path) fwd+bwd {row['shape']} | {row['fp32_ms']:.1f} ms fp32 | "
          f"{row['fp8_reference_ms']:.1f} ms fp8 | {row['ratio']:.1f}x |")  # fmt: skip
    return row


def bench_gpu(tokens: int = 4096) -> list[dict]:
    import torch
    from torch import nn

    from posttrain.fp8.gemm import BlockQuantized, active_backend, fp8_gemm_nt
    from posttrain.fp8.linear import FP8Linear

    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(dev)} (capability {torch.cuda.get_device_capability(dev)}), "
          f"FP8 GEMM backend: {active_backend(dev)}")  # fmt: skip
    rows = []
    shapes = {"expert up (7168->2048)": (2048, 7168), "expert down (2048->7168)": (7168, 2048),
              "dense up (7168->18432)": (18432, 7168), "dense down (18432->7168)": (7168, 18432)}  # fmt: skip
    for name, (n, k) in shapes.items():
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        xq, wq = BlockQuantized.quantize(x, (1, 128)), BlockQuantized.quantize(w, (128, 128))
        flops = 2 * tokens * n * k
        t_bf16 = _time(lambda: x @ w.T, 20, True)
        t_fp8 = _time(lambda: fp8_gemm_nt(xq, wq, torch.bfloat16), 20, True)
        t_fp8_q = _time(lambda: fp8_gemm_nt(BlockQuantized.quantize(x, (1, 128)), BlockQuantized.quantize(w, (128, 128)), torch.bfloat16), 20, True)

        ref = nn.Linear(k, n, bias=False, device=dev, dtype=torch.float32)
        layer = FP8Linear.from_linear(nn.Linear(k, n, bias=False, device=dev, dtype=torch.float32))
        xa = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, requires_grad=True)

        def step_ref():
            ref.weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ref(xa).float().sum().backward()

        def step_fp8():
            layer.weight.grad = None
            layer(xa).float().sum().backward()

        t_lref, t_lfp8 = _time(step_ref, 10, True), _time(step_fp8, 10, True)
        row = dict(
            shape=name, tokens=tokens, bf16_gemm_tflops=flops / t_bf16 / 1e12, fp8_gemm_tflops=flops / t_fp8 / 1e12,
            fp8_gemm_with_quant_tflops=flops / t_fp8_q / 1e12, bf16_layer_step_ms=t_lref * 1e3, fp8_layer_step_ms=t_lfp8 * 1e3,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard-mb", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--layers", type=int, default=5, help="synthetic model depth (4 MoE layers ~ 230 MB of fp8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-gpu", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, python {platform.python_version()}")
    print("| direction | shards | in shard MiB | out shard MiB | total in MiB | best s | MiB/s (read) | peak RSS over baseline MiB | peak / (in+out shard) |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {"conversion": bench_conversion(args.shard_mb, args.repeats, args.layers), "cpu_layer": bench_cpu_layer()}
    if torch.cuda.is_available() and not args.skip_gpu:
        results["gpu"] = bench_gpu()
    else:
        print("GPU section skipped: CUDA not available" if not torch.cuda.is_available() else "GPU section skipped")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
