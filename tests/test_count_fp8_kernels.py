"""benchmarks/count_fp8_kernels.py: the device kernels of an FP8 layer's forward+backward on the CUDA code path,
counted without a GPU. The counts are the regression check: an FP8Linear is three FP8 GEMMs and two one-read
quantizers, and nothing else, once its weight is cached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from subprocess_env import ROOT, repo_env

SCRIPT = ROOT / "benchmarks" / "count_fp8_kernels.py"


def test_an_fp8_linear_is_three_gemms_and_two_quantizers(tmp_path: Path):
    out = tmp_path / "counts.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--linear", "128", "256", "256", "--linear", "128", "256", "320",
         "--experts", "4", "128", "128", "128", "--json", str(out)],
        env=repo_env(OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(out.read_text())
    assert counts["FP8Linear 128 x 256 -> 256"] == {"F.scaled_mm": 3, "triton quantize_both": 2}
    # 320 outputs: the dgrad contracts over them, so dY is padded to 384 channels; the weight was padded once
    assert counts["FP8Linear 128 x 256 -> 320"] == {"F.scaled_mm": 3, "triton quantize_both": 2, "aten constant_pad_nd": 1}
    experts = counts["FP8 rowwise experts E=4, 128 routed tokens, 128 -> 128"]
    assert {k: experts[k] for k in ("F.scaled_grouped_mm", "torch._scaled_grouped_mm", "triton quantize",
                                    "triton quantize_token_runs")} == {
        "F.scaled_grouped_mm": 2, "torch._scaled_grouped_mm": 1, "triton quantize": 2, "triton quantize_token_runs": 2}
    assert experts["aten cumsum"] <= 3  # the forward's offsets and one token-run layout for both wgrad operands
