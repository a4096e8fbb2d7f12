"""benchmarks/count_mla_traffic.py: the MLA attention layer's kernels and memory traffic outside its GEMMs, on the
CUDA code path, counted without a GPU. The counts are the regression check of the fused query/key assembly
(posttrain/mla_attention.py): the rotary part's products, sums and concatenations, the key buffer's copies and the
zero-filled slices of the backward are gone, and the assembly moves under half of transformers' bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from subprocess_env import ROOT, repo_env

SCRIPT = ROOT / "benchmarks" / "count_mla_traffic.py"


def test_the_fused_assembly_launches_two_kernels_and_moves_under_half_of_transformers_bytes(tmp_path: Path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "32", "--json", str(out)],
                          env=repo_env(OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf, ours = json.loads(out.read_text())
    assert hf["impl"] == "transformers" and ours["impl"] == "posttrain fused"
    assert hf["gemm kernels"] == ours["gemm kernels"] == 12  # the same projections: 4 forward, 8 backward
    assert hf["attention and norm bytes"] == ours["attention and norm bytes"]  # the same attention and norm calls
    kernels = ours["kernels by name"]
    assert kernels["triton query_key_forward"] == 1 and kernels["triton query_key_backward"] == 1
    # (no clone: with the query in [B, S, heads, dim] order, flex writes its output in o_proj's layout)
    eager_only = {"aten mul", "aten sub", "aten neg", "aten slice_backward", "aten copy_", "aten zeros_like", "aten clone"}
    assert not eager_only & kernels.keys(), kernels
    assert eager_only <= hf["kernels by name"].keys()
    assert ours["kernels"] <= hf["kernels"] / 4
    assert ours["assembly bytes per token"] < hf["assembly bytes per token"] / 2, (ours, hf)
    # the same layer to bf16 rounding (the rotary part rounds once where the eager ops round each step); a wrong
    # index or sign would be O(1) off (tests/test_mla_attention.py bounds each kernel)
    assert ours["max rel diff"] <= 2.0**-5, ours
