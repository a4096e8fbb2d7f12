"""benchmarks/bench_gpu.py is only run for real on a lent GPU; its --cpu-smoke mode runs every section on
tiny CPU shapes so that the script cannot rot unnoticed between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_runs_every_section(tmp_path, capsys, one_torch_thread):
    bench = _load()
    out = tmp_path / "bench.json"
    rc = bench.main(["--cpu-smoke", "--sections", ",".join(bench.SECTIONS), "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True
    for section in ("gemm", "linear"):
        rows = data[section]
        assert len(rows) == len(bench.V3_SHAPES) and not [r for r in rows if "error" in r], rows
        assert all(0.01 < r.get("err_fp8", r.get("err_y")) < 0.06 for r in rows)  # really e4m3, and close
    experts = data["experts"]
    assert {r["impl"] for r in experts} == {"grouped_mm (bf16)", "posttrain_grouped (bf16)", "posttrain_fp8 auto",
                                           "posttrain_fp8 blockwise"}
    assert not [r for r in experts if "error" in r], experts
    quant = data["quant"]
    assert {r["backend"] for r in quant} >= {"eager"} and not [r for r in quant if "error" in r], quant
    assert all(r["scales_equal"] and r["max_e4m3_steps"] == 0 and r["gbs"] > 0 for r in quant if r["backend"] == "eager")
    lm = data["lm_head"]
    assert [r["impl"] for r in lm] == ["full logits", "fused", "recompute", "trl"] and not [r for r in lm if "error" in r], lm
    assert all(r["err_dh"] < 1e-5 and r["err_dw"] < 1e-5 for r in lm[1:])  # fp32 on the CPU: same gradients
    norm = data["norm"]
    assert [r["width"] for r in norm] == [2048, 2048, 7168, 7168, 512, 512] and not [r for r in norm if "error" in r]
    # on the CPU both rows are the eager formula (torch fuses RMSNorm on CUDA only): the same numbers
    assert not any(r["fused_kernel"] for r in norm) and all(r["max_steps_vs_eager"] == 0 for r in norm[1::2])
    mla = data["mla"]
    assert [r["impl"] for r in mla] == ["transformers eager", "posttrain"] * 2 and not [r for r in mla if "error" in r]
    # on the CPU both rows are transformers' forward (the kernels run on CUDA only): the same numbers
    assert not any(r["fused_kernels"] for r in mla) and all(r["err_y_vs_eager"] == 0 for r in mla[1::2])
    sft = data["sft_step"]
    assert {r["variant"] for r in sft} == {"fp32", "fp8"} and not [r for r in sft if "error" in r], sft
    for title in ("### GEMM", "### FP8Linear", "### Routed experts", "### FP8 quantizers", "### LM head", "### RMSNorm",
                  "### MLA attention", "## SFT step"):
        assert title in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_cuda_it_exits_non_zero_with_a_message(capsys):
    bench = _load()
    assert bench.main(["--sections", "gemm"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_stopped_section_keeps_the_rows_it_measured(tmp_path, capsys, monkeypatch):
    """gpu_session.sh stops a section at its time limit: the rows it had measured are printed and written (with
    "interrupted"), the sections after it are not run, and the exit status is 124."""
    import signal

    bench = _load()

    def stopped_after_one_row(ctx, args):
        ctx.section_rows("norm").append({"width": 2048, "ms": 1.5})
        raise KeyboardInterrupt  # what SIGTERM raises once raise_on_sigterm() is in place

    monkeypatch.setattr(bench, "section_norm", stopped_after_one_row)
    monkeypatch.setattr(bench, "section_mla", lambda ctx, args: pytest.fail("ran after the stop"))
    old = signal.getsignal(signal.SIGTERM)
    try:
        out = tmp_path / "bench.json"
        assert bench.main(["--cpu-smoke", "--sections", "env,norm,mla", "--json", str(out)]) == 124
        with pytest.raises(KeyboardInterrupt):  # main() made SIGTERM raise
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, old)
    data = json.loads(out.read_text())
    assert data["norm"] == {"interrupted": True, "rows": [{"width": 2048, "ms": 1.5}]} and "mla" not in data
    assert '{"width": 2048, "ms": 1.5}' in capsys.readouterr().out


SESSION = SCRIPT.parent / "gpu_session.sh"


def _session(tmp_path, name: str, **env):
    """gpu_session.sh run with a `python3` that fails at once (no GPU, no torch needed): every part it starts fails."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python3"
    fake.write_text("#!/bin/sh\necho 'fake python3: failing' >&2\nexit 3\n")
    fake.chmod(0o755)
    out = tmp_path / name
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(out), "BUDGET_S": "120",
           "TMPDIR": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SESSION), "run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, out


def test_gpu_session_fails_loudly_and_packs_only_its_own_files(tmp_path):
    """A lent GPU's session script: a section or part that fails (or an unknown part) makes `run` exit non-zero and
    is named in $OUT/FAILED; a second call on the same (warm) machine does not carry the first one's files."""
    import tarfile

    proc, out = _session(tmp_path, "first", PARTS="bench nosuchpart", SECTIONS="env:30")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = (out / "FAILED").read_text()
    assert "bench env (rc=3)" in failed and "unknown part 'nosuchpart'" in failed
    proc, out = _session(tmp_path, "second", PARTS="bench", SECTIONS="gemm:30")
    assert proc.returncode == 1 and "bench gemm (rc=3)" in (out / "FAILED").read_text()
    with tarfile.open(out / "gpu-out.tgz") as tgz:
        names = {Path(n).name for n in tgz.getnames()}
    assert "bench_gpu.gemm.err" in names and "bench_gpu.env.err" not in names, names
    assert "== env" not in (out / "bench_gpu.md").read_text()
