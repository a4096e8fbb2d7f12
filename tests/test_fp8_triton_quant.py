"""The Triton FP8 quantizers (posttrain.fp8.triton_quant): bit for bit the eager reference.

Without a GPU the kernels run under Triton's CPU interpreter. It must be switched on before Triton is
first imported (Triton's own jit'd library functions are built at import), so the cases run once in a
fresh process (``python tests/test_fp8_triton_quant.py`` with ``TRITON_INTERPRET=1``) that prints one JSON
line; the tests below read it. On CUDA the same cases run compiled (``-m gpu``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bits_equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    """Same shapes and bytes, element by element (fp8 compared as bytes, so -0 and +0 differ)."""
    def raw(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(raw(x), raw(y)) for x, y in zip(a, b))


def _rounding_rows() -> torch.Tensor:
    """Rows whose max-abs is 448 (so the scale is exactly 1 and the kernel's x / s is x) holding every
    e4m3 value, every midpoint between neighbours (ties, which round to the even one), the float32
    neighbours of each midpoint, and their negatives -- including the subnormals and the 2^-6 boundary."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0 .. 448 (0x7E), 0x7F is NaN
    vals = codes.view(torch.float8_e4m3fn).float()
    mids = (vals[:-1] + vals[1:]) / 2
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.zeros_like(mids))
    pos = torch.cat([vals, mids, up, down, torch.tensor([2.0**-10, 2.0**-11, 2.0**-6 - 2.0**-10])])
    allv = torch.cat([pos, -pos, torch.tensor([-0.0])])
    per_row = 127
    n_rows = math.ceil(allv.numel() / per_row)
    rows = torch.zeros(n_rows, 128)
    rows[:, 0] = 448.0
    flat = torch.zeros(n_rows * per_row)
    flat[: allv.numel()] = allv
    rows[:, 1:] = flat.reshape(n_rows, per_row)
    return rows


def _cases(device: str) -> dict[str, tuple]:
    """name -> (thunk through the public quantizers, thunk of the eager reference)."""
    from posttrain.fp8 import experts as E
    from posttrain.fp8 import quant as Q

    g = torch.Generator().manual_seed(11)
    # token magnitudes over 10^+-3, heavy tails (e4m3 subnormals), a partial last tile of 4 columns
    x = (torch.randn(300, 260, generator=g) * torch.rand(300, 260, generator=g) ** 4
         * 10.0 ** torch.randint(-3, 4, (300, 1), generator=g)).to(device)
    xb = x.to(torch.bfloat16)
    w = (torch.randn(3, 200, 260, generator=g) * 10.0 ** torch.randint(-3, 4, (3, 1, 1), generator=g)).to(device)
    q, s = Q.quantize_groups_reference(x, (1, 128), check_finite=False)
    r = _rounding_rows().to(device)
    runs = torch.tensor([65, 0, 200, 7, 28], device=device)
    xr = (torch.randn(37, 1300, generator=g) * 10.0 ** torch.randint(-3, 4, (37, 1), generator=g)).to(device)
    ref = Q.quantize_groups_reference
    return {
        "tiles 1x128 fp32": (lambda: Q.quantize_groups(x, (1, 128), check_finite=False),
                             lambda: ref(x, (1, 128), check_finite=False)),
        "tiles 1x128 bf16": (lambda: Q.quantize_groups(xb, (1, 128), check_finite=False),
                             lambda: ref(xb, (1, 128), check_finite=False)),
        "tiles 1x128 ue8m0": (lambda: Q.quantize_groups(x, (1, 128), "ue8m0", check_finite=False),
                              lambda: ref(x, (1, 128), "ue8m0", check_finite=False)),
        "activation [2, 3, 260] (quantize_tilewise_act)": (
            lambda: Q.quantize_tilewise_act(xb[:6].reshape(2, 3, 260)),
            lambda: (lambda t: (t[0].reshape(2, 3, 260), t[1].reshape(2, 3, 3)))(ref(xb[:6], (1, 128), check_finite=False))),
        "blocks 128x128 [E, N, K]": (lambda: Q.quantize_groups(w, (128, 128), check_finite=False),
                                     lambda: ref(w, (128, 128), check_finite=False)),
        "blocks 128x128 ue8m0 bf16": (lambda: Q.quantize_groups(w[0].to(torch.bfloat16), (128, 128), "ue8m0", check_finite=False),
                                      lambda: ref(w[0].to(torch.bfloat16), (128, 128), "ue8m0", check_finite=False)),
        "rows (grouped GEMM scales), 2 column chunks": (
            lambda: Q.quantize_rows(xr), lambda: (lambda t: (t[0], t[1].squeeze(-1)))(ref(xr, (1, 1300), check_finite=False))),
        "rows [E, N, K] bf16 ue8m0": (
            lambda: Q.quantize_rows(w.to(torch.bfloat16), "ue8m0"),
            lambda: (lambda t: (t[0], t[1].squeeze(-1)))(ref(w.to(torch.bfloat16), (1, 260), "ue8m0", check_finite=False))),
        "transposed tiles (wgrad dY^T)": (lambda: Q.quantize_groups_t(xb, (1, 128)),
                                          lambda: ref(xb.t(), (1, 128), check_finite=False)),
        "transposed tiles [E, M, K]": (lambda: Q.quantize_groups_t(w, (1, 128)),
                                       lambda: ref(w.transpose(-2, -1), (1, 128), check_finite=False)),
        "re-tile 1x128 -> 128x1 (wgrad X^T)": (lambda: Q.requantize_tiles_t(q, s),
                                               lambda: ref(Q.dequantize_groups(q, s, (1, 128)).t(), (1, 128))),
        "round to nearest e4m3, ties to even": (lambda: Q.quantize_groups(r, (1, 128), check_finite=False),
                                                lambda: ref(r, (1, 128), check_finite=False)),
        # the grouped wgrad's operand: runs of tokens per expert (one empty, one of 64 + 1 rows, one
        # shorter than a tile), one scale per (expert, channel), transposed, runs zero-padded to 16
        "token runs [C, S_pad] (grouped wgrad)": (lambda: E.quantize_token_runs(xb, runs),
                                                  lambda: E.quantize_token_runs_reference(xb, runs)),
        "token runs ue8m0 fp32": (lambda: E.quantize_token_runs(x, runs, "ue8m0"),
                                  lambda: E.quantize_token_runs_reference(x, runs, "ue8m0")),
    }


def run_cases(device: str) -> dict:
    """Every case through POSTTRAIN_FP8_QUANT=triton, with the number of Triton launches it took."""
    from posttrain.fp8 import quant as Q
    from posttrain.fp8 import triton_quant

    calls = []
    real = {name: getattr(triton_quant, name) for name in ("quantize", "quantize_token_runs")}

    def counted(fn):
        def call(*a, **k):
            out = fn(*a, **k)
            calls.append(out is not None)
            return out
        return call

    for name, fn in real.items():
        setattr(triton_quant, name, counted(fn))
    os.environ[Q.QUANT_BACKEND_ENV] = "triton"
    Q._compile_state["broken"] = True  # a shape Triton does not cover must not reach a CPU torch.compile
    results = {}
    try:
        for name, (got_fn, ref_fn) in _cases(device).items():
            calls.clear()
            got, want = got_fn(), ref_fn()
            results[name] = {
                "bits_equal": _bits_equal(got, want),
                "scales_equal": bool(torch.equal(got[1], want[1])),
                "max_e4m3_steps": int(Q.e4m3_step_distance(got[0], want[0]).max()) if got[0].shape == want[0].shape else -1,
                "triton_launches": sum(calls),
            }
        x = torch.randn(6, 140, device=device)
        calls.clear()
        got = Q.quantize_groups(x, (1, 70), check_finite=False)  # groups of 70: no Triton kernel, falls back
        want = Q.quantize_groups_reference(x, (1, 70), check_finite=False)
        results["other group shapes fall back"] = {"bits_equal": _bits_equal(got, want), "triton_launches": sum(calls)}
        # the check quant_backend() runs before picking Triton on CUDA (it compares every kernel directly)
        results["start-up check"] = Q._triton_check(torch.device(device))
        results["triton_broken"] = bool(Q._triton_state.get("broken"))
    finally:
        for name, fn in real.items():
            setattr(triton_quant, name, fn)
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_bit_exact(results: dict) -> None:
    assert not results.pop("triton_broken"), "the Triton kernel failed and the fallback ran instead"
    assert results.pop("start-up check") is None
    fallback = results.pop("other group shapes fall back")
    for name, r in results.items():
        assert r["triton_launches"] >= 1, f"{name}: the Triton kernel did not run"
        assert r["scales_equal"], f"{name}: scales differ"
        assert r["bits_equal"], f"{name}: fp8 differs by up to {r['max_e4m3_steps']} e4m3 steps"
    assert fallback == {"bits_equal": True, "triton_launches": 0}


def test_triton_quantizers_equal_the_reference_bit_for_bit_in_the_interpreter(interpreted):
    """Activation 1x128 tiles, weight 128x128 blocks (with expert dims), row-wise scales, UE8M0 scales, the
    wgrad's transposed tiles, the fp8 re-tiling and the grouped wgrad's token runs, partial last tiles,
    subnormals, and every rounding tie of e4m3:
    the kernel's fp8 bytes and scales equal the eager reference exactly (the rule the compiled quantizer
    only meets within one e4m3 step)."""
    _assert_bit_exact(dict(interpreted))


@pytest.mark.gpu
def test_triton_quantizers_equal_the_reference_bit_for_bit_on_cuda(monkeypatch):
    from posttrain.fp8 import quant as Q

    monkeypatch.setattr(Q, "_compile_state", {})
    monkeypatch.setattr(Q, "_triton_state", {})
    monkeypatch.setenv(Q.QUANT_BACKEND_ENV, "triton")  # run_cases sets it; monkeypatch restores it
    _assert_bit_exact(run_cases("cuda"))
    # and the V3 activation shape of the acceptance figure
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    got = Q.quantize_groups(x, (1, 128), check_finite=False)
    assert _bits_equal(got, Q.quantize_groups_reference(x, (1, 128), check_finite=False))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the tests in this file do)")
    print(json.dumps(run_cases("cpu")))
