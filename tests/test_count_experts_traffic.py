"""benchmarks/count_experts_traffic.py: the routed experts' kernels and memory traffic outside the grouped GEMMs,
on the CUDA code path, counted without a GPU. The counts are the regression check of the fused dispatch and
combine (posttrain/routed_experts.py) and SwiGLU (posttrain/swiglu.py): the gathers' zero-filled backward buffers,
the fp32 copies of every routed row and the gating's separate passes are gone, and the layer moves under a quarter
of transformers' bytes outside its GEMMs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from subprocess_env import ROOT, repo_env

SCRIPT = ROOT / "benchmarks" / "count_experts_traffic.py"


def test_the_fused_routing_moves_under_a_quarter_of_transformers_bytes(tmp_path: Path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tokens", "64", "--hidden", "256", "--inter", "128", "--experts", "8",
         "--top-k", "6", "--json", str(out)],
        env=repo_env(OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf, ours = json.loads(out.read_text())
    assert hf["impl"] == "grouped_mm (transformers)" and ours["impl"] == "posttrain_grouped"
    assert hf["gemm kernels"] == ours["gemm kernels"] == 6  # the same grouped GEMMs: 2 forward, 4 backward
    kernels = ours["kernels by name"]
    assert kernels["triton sum_rows"] == 2 and kernels["triton sum_rows_backward"] == 1
    assert kernels["triton swiglu_forward"] == 1 and kernels["triton swiglu_backward"] == 1
    # no zero-filled buffers for the gathers' backward, no index_put accumulation, no fp32 casts of the rows,
    # no separate silu, products and concatenation
    eager_only = {"aten new_zeros", "aten index_put", "aten _to_copy", "aten silu", "aten silu_backward", "aten mul",
                  "aten cat"}
    assert not eager_only & kernels.keys(), kernels
    assert eager_only <= hf["kernels by name"].keys()
    assert ours["kernels"] <= hf["kernels"] / 2
    assert ours["glue bytes per routed element"] < hf["glue bytes per routed element"] / 4, (ours, hf)
    # the same layer to bf16 rounding (the gating rounds once where the eager ops round twice); a wrong index
    # or weight would be O(1) off (tests/test_routed_experts.py bounds each kernel)
    assert max(ours["rel diff y"], ours["rel diff d hidden"], ours["rel diff d gating values"]) <= 2.0**-5, ours
