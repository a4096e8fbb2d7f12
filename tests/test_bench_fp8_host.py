"""benchmarks/bench_fp8_host.py times the FP8Linear Hopper code path's host work with every kernel stubbed, beside
bf16 nn.Linear on the meta device (issue #13: the thin FP8 layers are launch-bound on an H100)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from subprocess_env import repo_env

ROOT = Path(__file__).resolve().parents[1]


def test_the_host_benchmark_times_the_fast_path_with_its_kernels_stubbed(tmp_path):
    out = tmp_path / "host.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_fp8_host.py"), "--linear", "128", "256", "256",
         "--linear", "128", "512", "320", "--calls", "3", "--repeats", "2", "--json", str(out)],
        env=repo_env(OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["shape"] for r in rows] == ["128 x 256 -> 256", "128 x 512 -> 320"]
    for r in rows:
        assert r["fp8_host_us"] > 0 and r["bf16_host_us"] > 0
        assert r["ratio"] == r["fp8_host_us"] / r["bf16_host_us"]
        # the timed calls took the Hopper path, kernels stubbed: three GEMMs and the two one-read quantizers
        assert r["stub_calls_per_step"] == {"F.scaled_mm": 3, "triton kernels": 2}
    assert "| 128 x 512 -> 320 |" in proc.stdout
