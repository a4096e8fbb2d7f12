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
import sys

import pytest
import torch
from subprocess_env import run_in_triton_interpreter  # noqa: E402
from triton_ptx import h100_ptx  # noqa: E402



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


def _flat(pairs: tuple) -> tuple[torch.Tensor, ...]:
    return tuple(t for pair in pairs for t in pair)


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
    xq_rows, xs_rows = Q.quantize_groups_reference(xb, (1, 260), check_finite=False)
    xs_rows = xs_rows.squeeze(-1)
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
        # both operands of one activation-side tensor from one read (FP8Linear): X with X^T re-tiled from its
        # fp8 tiles, and dY with dY^T quantized from dY; 300 tokens (a partial token tile), 260 channels
        "X and X^T re-tiled, one read": (
            lambda: _flat(Q.quantize_tiles_and_t(xb, requantize=True)),
            lambda: (lambda t: t + ref(Q.dequantize_groups(*t, (1, 128)).t(), (1, 128)))(ref(xb, (1, 128), check_finite=False))),
        "dY and dY^T, one read, ue8m0": (
            lambda: _flat(Q.quantize_tiles_and_t(x, scale_fmt="ue8m0")),
            lambda: ref(x, (1, 128), "ue8m0", check_finite=False) + ref(x.t(), (1, 128), "ue8m0", check_finite=False)),
        "round to nearest e4m3, ties to even": (lambda: Q.quantize_groups(r, (1, 128), check_finite=False),
                                                lambda: ref(r, (1, 128), check_finite=False)),
        # the grouped wgrad's operand: runs of tokens per expert (one empty, one of 64 + 1 rows, one
        # shorter than a tile), one scale per (expert, channel), transposed, runs zero-padded to 16
        "token runs [C, S_pad] (grouped wgrad)": (lambda: E.quantize_token_runs(xb, runs),
                                                  lambda: E.quantize_token_runs_reference(xb, runs)),
        "token runs ue8m0 fp32": (lambda: E.quantize_token_runs(x, runs, "ue8m0"),
                                  lambda: E.quantize_token_runs_reference(x, runs, "ue8m0")),
        # the same from the row-wise fp8 activation cache, dequantized on the fly (the grouped wgrad's X^T)
        "token runs from fp8 with row scales": (lambda: E.quantize_token_runs(xq_rows, runs, row_scale=xs_rows),
                                                lambda: E.quantize_token_runs_reference(xq_rows, runs, row_scale=xs_rows)),
    }


def _with_bits(x: torch.Tensor, bits: dict[tuple[int, ...], int]) -> torch.Tensor:
    """A copy of ``x`` (float32 or bf16) with the elements at the given indices set to raw bit patterns."""
    x = x.clone()
    width = 8 * x.element_size()
    view = x.view(torch.int32 if width == 32 else torch.int16)
    for idx, b in bits.items():
        view[idx] = b - (1 << width) if b >= 1 << (width - 1) else b
    return x


# float32 NaNs: the GPU's canonical one (every NaN an NVIDIA GPU computes) and its negation, NumPy's and torch's,
# the x86 default (negative), a signalling one; infinities. In 1x128 tiles each has a group of its own, but for
# row 5's NaN and infinity. The interpreter's max-abs and clamp skip NaN (np.nanmax, np.fmax) as sm_90's do.
_NAN32, _NEG_NAN32 = 0x7FFFFFFF, 0xFFFFFFFF
_NONFINITE32 = {(0, 5): _NAN32, (1, 130): _NEG_NAN32, (2, 258): 0x7FC00000, (3, 7): 0xFFC00000,
                (4, 200): 0x7F800001, (5, 3): 0x7F800000, (5, 4): _NAN32, (6, 10): 0x7F800000,
                (7, 129): 0xFF800000, (150, 100): _NAN32, (299, 259): _NEG_NAN32}
_NONFINITE16 = {(0, 5): 0x7FFF, (1, 130): 0xFFFF, (2, 258): 0x7FC0, (6, 10): 0x7F80, (7, 129): 0xFF80,
                (150, 100): 0x7FFF}


def _interpreter_decodes_fp8_nan() -> None:
    """Triton's interpreter (3.9 here) decodes e4m3's NaN, S.1111.111, as ±480: its float conversion has no NaN case.
    The hardware's cvt decodes it as NaN, torch as NaN with its sign. Patched so, in the interpreter's process,
    for the kernels that read fp8 (the re-tile, X^T from X's fp8 tiles, token runs from the fp8 cache)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        out = real(self, src, dst_type, rounding_mode)
        if src.dtype.scalar != tl.float8e4nv or dst_type.scalar != tl.float32:
            return out
        nan = np.copysign(np.float32("nan"), np.where(src.data >= 0x80, -1.0, 1.0)).astype(np.float32)
        return interpreter.TensorHandle(np.where(src.data & 0x7F == 0x7F, nan, out.data), out.dtype)

    interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp


def _nonfinite_cases(device: str) -> dict[str, tuple]:
    """NaN and infinity through every kernel: the NaN stays fp8 NaN and its group's scale is the reference's
    (1: ``amax > 0`` is false for a NaN max-abs; with UE8M0, 1 for an infinite one too)."""
    from posttrain.fp8 import experts as E
    from posttrain.fp8 import quant as Q

    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(300, 260, generator=g) * 10.0 ** torch.randint(-3, 4, (300, 1), generator=g)
    x = _with_bits(x0, _NONFINITE32).to(device)
    xb = _with_bits(x0.to(torch.bfloat16), _NONFINITE16).to(device)
    w = _with_bits(torch.randn(600, 260, generator=g), _NONFINITE32).reshape(3, 200, 260).to(device)
    xr = _with_bits(torch.randn(37, 1300, generator=g), {(0, 1): _NAN32, (3, 1299): _NEG_NAN32, (10, 1025): 0xFFC00000,
                                                         (20, 500): 0x7F800000}).to(device)
    ref = Q.quantize_groups_reference
    runs = torch.tensor([65, 0, 200, 7, 28], device=device)
    qp, sp = ref(x, (1, 128), check_finite=False)
    xq_rows, xs_rows = ref(xb, (1, 260), check_finite=False)
    xs_rows = xs_rows.squeeze(-1)

    def rows_ref(t: torch.Tensor, fmt: str | None = None):
        q, s = ref(t.contiguous(), (1, t.shape[-1]), fmt, check_finite=False)
        return q, s.squeeze(-1)

    cases = {}
    for fmt in (None, "ue8m0"):
        tag = fmt or "fp32"
        cases |= {
            f"tiles 1x128 fp32, {tag}": (lambda f=fmt: Q.quantize_groups(x, (1, 128), f, check_finite=False),
                                         lambda f=fmt: ref(x, (1, 128), f, check_finite=False)),
            f"blocks 128x128 [E, N, K], {tag}": (lambda f=fmt: Q.quantize_groups(w, (128, 128), f, check_finite=False),
                                                 lambda f=fmt: ref(w, (128, 128), f, check_finite=False)),
            f"rows, {tag}": (lambda f=fmt: Q.quantize_rows(xr, f), lambda f=fmt: rows_ref(xr, f)),
            f"rows of W^T read from W, {tag}": (lambda f=fmt: Q.quantize_rows(w.transpose(-2, -1), f),
                                                lambda f=fmt: rows_ref(w.transpose(-2, -1), f)),
            f"transposed tiles, {tag}": (lambda f=fmt: Q.quantize_groups_t(x, (1, 128), f),
                                         lambda f=fmt: ref(x.t(), (1, 128), f, check_finite=False)),
            f"dY and dY^T, one read, {tag}": (
                lambda f=fmt: _flat(Q.quantize_tiles_and_t(x, scale_fmt=f)),
                lambda f=fmt: ref(x, (1, 128), f, check_finite=False) + ref(x.t(), (1, 128), f, check_finite=False)),
            f"token runs fp32, {tag}": (lambda f=fmt: E.quantize_token_runs(x, runs, f),
                                        lambda f=fmt: E.quantize_token_runs_reference(x, runs, f)),
        }
    return cases | {
        "tiles 1x128 bf16": (lambda: Q.quantize_groups(xb, (1, 128), check_finite=False),
                             lambda: ref(xb, (1, 128), check_finite=False)),
        "transposed tiles bf16": (lambda: Q.quantize_groups_t(xb, (1, 128)),
                                  lambda: ref(xb.t(), (1, 128), check_finite=False)),
        "token runs bf16": (lambda: E.quantize_token_runs(xb, runs), lambda: E.quantize_token_runs_reference(xb, runs)),
        "re-tile 1x128 -> 128x1": (
            lambda: Q.requantize_tiles_t(qp, sp),
            lambda: ref(Q.dequantize_groups(qp, sp, (1, 128)).t(), (1, 128), check_finite=False)),
        "X and X^T re-tiled, one read": (
            lambda: _flat(Q.quantize_tiles_and_t(xb, requantize=True)),
            lambda: (lambda t: t + ref(Q.dequantize_groups(*t, (1, 128)).t(), (1, 128), check_finite=False))(
                ref(xb, (1, 128), check_finite=False))),
        "token runs from fp8 with row scales": (
            lambda: E.quantize_token_runs(xq_rows, runs, row_scale=xs_rows),
            lambda: E.quantize_token_runs_reference(xq_rows, runs, row_scale=xs_rows)),
    }


def _compare(got: tuple, want: tuple, launches: int) -> dict:
    from posttrain.fp8 import quant as Q

    fp8 = [t for t in want if t.dtype == torch.float8_e4m3fn]
    return {
        "bits_equal": _bits_equal(got, want),
        "scales_equal": all(torch.equal(g, w) for g, w in zip(got, want) if w.dtype != torch.float8_e4m3fn),
        "max_e4m3_steps": int(Q.e4m3_step_distance(got[0], want[0]).max()) if got[0].shape == want[0].shape else -1,
        # fp8 NaN bytes the reference wrote (0x7F, 0xFF): the cases must hold some
        "nan_bytes": sum(int((t.view(torch.uint8) & 0x7F == 0x7F).sum()) for t in fp8),
        "triton_launches": launches,
    }


def run_cases(device: str) -> dict:
    """Every case through POSTTRAIN_FP8_QUANT=triton, with the number of Triton launches it took."""
    from posttrain.fp8 import quant as Q
    from posttrain.fp8 import triton_quant

    calls = []
    real = {name: getattr(triton_quant, name) for name in ("quantize", "quantize_both", "quantize_token_runs")}

    def counted(name, fn):
        def call(*a, **k):
            out = fn(*a, **k)
            if out is not None:
                calls.append(name)
            return out
        return call

    for name, fn in real.items():
        setattr(triton_quant, name, counted(name, fn))
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
                "triton_launches": len(calls),
            }
        nonfinite = {}
        for name, (got_fn, ref_fn) in _nonfinite_cases(device).items():
            calls.clear()
            got = got_fn()
            nonfinite[name] = _compare(got, ref_fn(), len(calls))
        results["non-finite"] = nonfinite
        # above the chunk size: a stack the kernels read in place goes in one launch (no chunks, no copies of
        # their outputs), W^T's rows (the grouped dgrad's operand) read from W included; a strided view the
        # row-wise kernel must copy first still goes in chunks, which bound that high-precision copy
        w = torch.randn(2, 136, 144, device=device) * 10.0 ** torch.arange(-1, 1, device=device).view(2, 1, 1)
        w[1, 7, 5] = -3e3  # one column with an outlier: its own scale
        wb = w.to(torch.bfloat16)
        qs0 = Q.quantize_groups_reference(w[0], (1, 128), check_finite=False)
        chunk, Q.QUANT_CHUNK_ELEMS = Q.QUANT_CHUNK_ELEMS, 4096
        try:
            for name, got_fn, want in (
                ("above the chunk size, in place", lambda: Q.quantize_groups(w, (128, 128), check_finite=False),
                 Q.quantize_groups_reference(w, (128, 128), check_finite=False)),
                ("above the chunk size, rows of W^T", lambda: Q.quantize_rows(wb.transpose(-2, -1)),
                 Q.quantize_groups_reference(wb.transpose(-2, -1).contiguous(), (1, 136), check_finite=False)),
                ("above the chunk size, rows of W^T ue8m0 fp32", lambda: Q.quantize_rows(w.transpose(-2, -1), "ue8m0"),
                 Q.quantize_groups_reference(w.transpose(-2, -1).contiguous(), (1, 136), "ue8m0", check_finite=False)),
                ("above the chunk size, re-tile", lambda: Q.requantize_tiles_t(*qs0),
                 Q.quantize_groups_reference(Q.dequantize_groups(*qs0, (1, 128)).t(), (1, 128))),
                ("above the chunk size, a strided view", lambda: Q.quantize_rows(w[:, :, :130].transpose(-2, -1)),
                 Q.quantize_groups_reference(w[:, :, :130].transpose(-2, -1).contiguous(), (1, 136), check_finite=False)),
            ):
                calls.clear()
                got = got_fn()
                want = (want[0], want[1].reshape(got[1].shape))
                results[name] = {"bits_equal": _bits_equal(got, want), "triton_launches": len(calls)}
        finally:
            Q.QUANT_CHUNK_ELEMS = chunk
        # one matrix in 1x128 tiles (X, dY, dY^T, X^T: the GEMMs' activation-side operands) gets its scales
        # column-major, F.scaled_mm's layout for them, so that no GEMM copies them
        xa = torch.randn(48, 300, device=device)
        qa, sa = Q.quantize_groups(xa, (1, 128), check_finite=False)
        both = [Q.quantize_tiles_and_t(xa, requantize=r) for r in (False, True)]
        results["1x128 scales column-major"] = [
            tuple(s.stride()) == (1, s.shape[0]) for s in (
                sa, Q.quantize_groups_t(xa, (1, 128))[1], Q.requantize_tiles_t(qa, sa)[1],
                *(pair[1] for got in both for pair in got))]
        x = torch.randn(6, 140, device=device)
        calls.clear()
        got = Q.quantize_groups(x, (1, 70), check_finite=False)  # groups of 70: no Triton kernel, falls back
        want = Q.quantize_groups_reference(x, (1, 70), check_finite=False)
        results["other group shapes fall back"] = {"bits_equal": _bits_equal(got, want), "triton_launches": len(calls)}
        # FP8Linear forward+backward: X with X^T in one launch, dY with dY^T in one (and W's blocks), where the
        # separate quantizers took five; output and gradients those of the eager quantizers, bit for bit
        results["FP8Linear forward+backward"] = _fp8_linear_both_backends(device, calls)
        # the check quant_backend() runs before picking Triton on CUDA (it compares every kernel directly)
        results["start-up check"] = Q._triton_check(torch.device(device))
        results["one-read start-up check"] = Q._one_read_check(torch.device(device))
        # a one-read kernel that fails turns off itself only: the separate Triton kernels still run, same bits
        real_both = triton_quant.quantize_both
        triton_quant.quantize_both = lambda *a: 1 / 0
        try:
            calls.clear()
            got = _flat(Q.quantize_tiles_and_t(xa, requantize=True))
            want = _flat((Q.quantize_groups_reference(xa, (1, 128), check_finite=False),
                          Q.quantize_groups_reference(Q.dequantize_groups(qa, sa, (1, 128)).t(), (1, 128))))
            results["one-read failure"] = {"bits_equal": _bits_equal(got, want), "launches": sorted(calls),
                                           "off": bool(Q._triton_state.pop("one read off", False))}
        finally:
            triton_quant.quantize_both = real_both
        results["triton_broken"] = bool(Q._triton_state.get("broken"))
    finally:
        for name, fn in real.items():
            setattr(triton_quant, name, fn)
    return results


def _fp8_linear_both_backends(device: str, calls: list) -> dict:
    from posttrain.fp8 import quant as Q
    from posttrain.fp8.gemm import fast_path_active
    from posttrain.fp8.linear import clear_weight_cache, fp8_linear

    fast_path_active(device)  # on CUDA the GEMM's start-up probe quantizes too: run it before counting
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randn(300, 260, generator=g) * 10.0 ** torch.randint(-2, 3, (300, 1), generator=g)).to(device)
    gy = (torch.randn(300, 130, generator=g) * 10.0 ** torch.randint(-2, 3, (300, 1), generator=g)).to(device)
    w = torch.nn.Parameter((torch.randn(130, 260, generator=g) / 16).to(device))
    out = {}
    for backend in ("triton", "eager"):
        os.environ[Q.QUANT_BACKEND_ENV] = backend
        clear_weight_cache()
        calls.clear()
        w.grad = None
        x = x0.clone().requires_grad_(True)
        y = fp8_linear(x, w)
        y.backward(gy)
        out[backend] = (y.detach(), x.grad, w.grad.clone(), sorted(calls))
    os.environ[Q.QUANT_BACKEND_ENV] = "triton"
    (*got, launches), (*want, _) = out["triton"], out["eager"]
    return {"bits_equal": _bits_equal(tuple(got), tuple(want)), "launches": launches}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_in_triton_interpreter(__file__)


def _assert_nonfinite(results: dict) -> None:
    assert len(results) == 20
    for name, r in results.items():
        assert r["triton_launches"] >= 1, f"{name}: the Triton kernel did not run"
        assert r["nan_bytes"] > 0, f"{name}: the reference wrote no NaN"
        assert r["scales_equal"], f"{name}: scales differ"
        assert r["bits_equal"], f"{name}: fp8 differs by up to {r['max_e4m3_steps']} e4m3 steps"


def _assert_bit_exact(results: dict) -> None:
    assert not results.pop("triton_broken"), "the Triton kernel failed and the fallback ran instead"
    results.pop("non-finite")  # _assert_nonfinite, a test of its own
    assert results.pop("start-up check") is None
    assert results.pop("one-read start-up check") is None
    assert results.pop("one-read failure") == {"bits_equal": True, "launches": ["quantize", "quantize"], "off": True}
    fallback = results.pop("other group shapes fall back")
    assert results.pop("1x128 scales column-major") == [True] * 7
    for name in ("above the chunk size, in place", "above the chunk size, rows of W^T",
                 "above the chunk size, rows of W^T ue8m0 fp32", "above the chunk size, re-tile"):
        assert results.pop(name) == {"bits_equal": True, "triton_launches": 1}, name
    assert results.pop("FP8Linear forward+backward") == {
        "bits_equal": True, "launches": ["quantize", "quantize_both", "quantize_both"]}
    chunked = results.pop("above the chunk size, a strided view")
    assert chunked["bits_equal"] and chunked["triton_launches"] > 1, chunked
    for name in ("X and X^T re-tiled, one read", "dY and dY^T, one read, ue8m0"):
        assert results[name]["triton_launches"] == 1, f"{name}: not one kernel"
    for name, r in results.items():
        assert r["triton_launches"] >= 1, f"{name}: the Triton kernel did not run"
        assert r["scales_equal"], f"{name}: scales differ"
        assert r["bits_equal"], f"{name}: fp8 differs by up to {r['max_e4m3_steps']} e4m3 steps"
    assert fallback == {"bits_equal": True, "triton_launches": 0}


def test_triton_quantizers_equal_the_reference_bit_for_bit_in_the_interpreter(interpreted):
    """Activation 1x128 tiles, weight 128x128 blocks (with expert dims), row-wise scales, UE8M0 scales, the
    wgrad's transposed tiles, the fp8 re-tiling, both tilings of X or dY from one read (one launch) and the
    grouped wgrad's token runs, partial last tiles,
    subnormals, and every rounding tie of e4m3:
    the kernel's fp8 bytes and scales equal the eager reference exactly (the rule the compiled quantizer
    only meets within one e4m3 step)."""
    _assert_bit_exact(dict(interpreted))


def test_nan_and_infinity_come_out_as_the_reference_writes_them_in_the_interpreter(interpreted):
    """Every kernel (tiles, blocks, rows, rows of W^T, transposed tiles, both tilings from one read, the re-tile,
    token runs) on NaNs of every bit pattern -- the GPU's canonical 0x7FFFFFFF included -- and infinities: a NaN
    stays fp8 NaN (0x7F, 0xFF with the sign the quotient has), its group's scale is the reference's 1 and the
    group's other values are quantized with it; an infinity gives its group the reference's scale (infinite, or
    1 with UE8M0). Before, the max-abs and the clamp skipped the NaN (sm_90's max.f32 / min.f32 return the other
    operand, as the interpreter's np.nanmax / np.fmax do): it came out as -448 times a finite scale."""
    _assert_nonfinite(dict(interpreted["non-finite"]))


@pytest.mark.gpu
def test_triton_quantizers_equal_the_reference_bit_for_bit_on_cuda(monkeypatch):
    from posttrain.fp8 import quant as Q

    monkeypatch.setattr(Q, "_compile_state", {})
    monkeypatch.setattr(Q, "_triton_state", {})
    monkeypatch.setenv(Q.QUANT_BACKEND_ENV, "triton")  # run_cases sets it; monkeypatch restores it
    results = run_cases("cuda")
    _assert_nonfinite(results["non-finite"])
    _assert_bit_exact(results)
    # and the V3 activation shape of the acceptance figure
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    got = Q.quantize_groups(x, (1, 128), check_finite=False)
    assert _bits_equal(got, Q.quantize_groups_reference(x, (1, 128), check_finite=False))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the tests in this file do)")
    _interpreter_decodes_fp8_nan()
    print(json.dumps(run_cases("cpu")))


# --- what the kernels become on an H100, compiled here (tests/triton_ptx.py) ------------------------------
_ptx = h100_ptx


def _tiles(**kw) -> dict:
    # ss_r = 1: one matrix in 1x128 tiles writes its scales column-major (what F.scaled_mm takes)
    base = dict(TRANSPOSED=False, EVEN_CONTIG=True, BLOCK_R=32, GROUP_R=1, GROUP_C=128, HAS_IN_SCALE=False,
                IN_TILE_R=1, IN_TILE_C=1, UE8M0=False, ss_r=1)
    return {**base, **kw}


def test_every_kernel_configuration_compiles_for_the_h100_with_ieee_division_and_vector_loads():
    import re

    from posttrain.fp8 import triton_quant as T

    bf16_in = {"x_ptr": "bf16", "in_s_ptr": "bf16", "q_ptr": "fp8", "s_ptr": "fp32"}
    configs = {
        "activation 1x128 (bf16)": (T._quant_tiles_kernel, bf16_in, _tiles()),
        "activation 1x128 UE8M0, partial last tile": (T._quant_tiles_kernel, bf16_in, _tiles(UE8M0=True, EVEN_CONTIG=False)),
        "weight 128x128 (fp32 master)": (T._quant_tiles_kernel, {"q_ptr": "fp8"}, _tiles(BLOCK_R=128, GROUP_R=128)),
        "transposed tiles (wgrad dY^T)": (T._quant_tiles_kernel, bf16_in, _tiles(TRANSPOSED=True, BLOCK_R=64)),
        "re-tile fp8 1x128 -> 128x1": (T._quant_tiles_kernel, {"x_ptr": "fp8", "q_ptr": "fp8"},
                                       _tiles(TRANSPOSED=True, BLOCK_R=128, HAS_IN_SCALE=True, IN_TILE_R=128)),
        "X and X^T, one read": (T._quant_both_kernel, {"x_ptr": "bf16", "q_ptr": "fp8", "qt_ptr": "fp8"},
                                dict(TILE=128, REQUANT=True, EVEN_COLS=True, UE8M0=False)),
        "dY and dY^T, one read": (T._quant_both_kernel, {"x_ptr": "bf16", "q_ptr": "fp8", "qt_ptr": "fp8"},
                                  dict(TILE=128, REQUANT=False, EVEN_COLS=True, UE8M0=False)),
        "rows": (T._quant_rows_kernel, {"x_ptr": "bf16", "q_ptr": "fp8"}, dict(BLOCK_R=4, BLOCK_C=1024, UE8M0=False)),
        "rows of W^T, read from W": (T._quant_rows_t_kernel, {"x_ptr": "bf16", "q_ptr": "fp8"},
                                     dict(BLOCK_R=64, BLOCK_C=64, UE8M0=False)),
        "token runs": (T._token_runs_kernel, {"t_ptr": "bf16", "q_ptr": "fp8", "starts_ptr": "i64", "counts_ptr": "i64",
                                                "pstarts_ptr": "i64", "plens_ptr": "i64"},
                       dict(BLOCK_T=64, BLOCK_C=128, UE8M0=False, RUN_ALIGN=16, HAS_IN_SCALE=False)),
        "token runs from fp8 with row scales": (
            T._token_runs_kernel, {"t_ptr": "fp8", "in_s_ptr": "fp32", "q_ptr": "fp8", "starts_ptr": "i64",
                                   "counts_ptr": "i64", "pstarts_ptr": "i64", "plens_ptr": "i64"},
            dict(BLOCK_T=64, BLOCK_C=128, UE8M0=False, RUN_ALIGN=16, HAS_IN_SCALE=True)),
    }
    warps = {"X and X^T, one read": 16, "dY and dY^T, one read": 16}  # as triton_quant.quantize_both launches them
    ptx = {name: _ptx(kernel, ptrs, consts, warps.get(name, 4)) for name, (kernel, ptrs, consts) in configs.items()}
    for name, text in ptx.items():
        assert "div.rn.f32" in text and not re.search(r"div\.(full|approx)", text), name  # IEEE, as the reference
        assert "cvt.rn.satfinite.e4m3x2.f32" in text, name  # the hardware cast, of values e4m3 holds exactly
    # the activation quantizer reads bf16 in vectors and writes fp8 in vectors (the 1.5 TB/s figure needs it)
    assert re.search(r"ld\.global(\.\w+)*\.v[24]", ptx["activation 1x128 (bf16)"])
    assert re.search(r"st\.global(\.\w+)*\.v[24]", ptx["activation 1x128 (bf16)"])
    # the transposed outputs (the wgrad's dY^T and X^T, the grouped wgrad's token runs) are stored in vectors:
    # their row length, a token count, is specialized on divisibility by 16 (rows padded to 128 tokens always
    # are; the runs are 16-aligned by construction), and the re-tile reads one input scale per column
    for name in ("transposed tiles (wgrad dY^T)", "re-tile fp8 1x128 -> 128x1", "token runs",
                 "token runs from fp8 with row scales",
                 "X and X^T, one read", "dY and dY^T, one read"):
        assert re.search(r"st\.global(\.\w+)*\.v4", ptx[name]), name
        assert not re.search(r"st\.global\.b8", ptx[name]), name
    assert len(re.findall(r"ld\.global\.b32", ptx["re-tile fp8 1x128 -> 128x1"])) <= 2
    for name in ("X and X^T, one read", "dY and dY^T, one read"):  # x read once, in vectors
        assert re.search(r"ld\.global(\.\w+)*\.v[24]", ptx[name]), name
    # W^T's rows are read from W along its contiguous dim and stored through a re-layout: vectors both ways
    assert re.search(r"ld\.global(\.\w+)*\.v4", ptx["rows of W^T, read from W"])
    assert re.search(r"st\.global(\.\w+)*\.v4", ptx["rows of W^T, read from W"])
