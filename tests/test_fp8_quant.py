"""Block / tile FP8 quantization math (posttrain.fp8.quant)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.fp8.quant import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_blockwise,
    dequantize_tilewise_act,
    e4m3_error_bound,
    expand_scale,
    quantize_blockwise,
    quantize_tilewise_act,
    round_scale_to_pow2,
    scale_to_float32,
)

# Bound slack: only the fp32 rounding of w / s and q * s on top of e4m3's half-ulp.
SLACK = 1 + 1e-5


def _blocky_weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random weight whose 128x128 blocks differ in magnitude by up to 10^±3, so that a block
    read with the wrong scale (e.g. a mis-inferred block size) is off by orders of magnitude,
    and heavy tails put some values into e4m3's subnormal range."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape[-2], shape[-1]
    grid = (*shape[:-2], math.ceil(rows / 128), math.ceil(cols / 128))
    mags = 10.0 ** torch.randint(-3, 4, grid, generator=g).float()
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 6
    return w * expand_scale(mags, shape, (128, 128))


@pytest.mark.parametrize("shape", [(576, 896), (200, 130), (256, 384), (3, 130, 260)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_blockwise_roundtrip_within_e4m3_bound(shape, scale_fmt):
    w = _blocky_weight(shape)
    q, s = quantize_blockwise(w, scale_fmt=scale_fmt)
    grid = (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == grid
    d = dequantize_blockwise(q, s, out_dtype=torch.float32)
    bound = e4m3_error_bound(w, expand_scale(s, shape, (128, 128)))
    err = (d - w).abs()
    assert bool((err <= bound * SLACK).all()), f"worst err/bound {(err / bound).max():.4f}"
    # the bound is tight: a coarser format (or a scale off by 2x) would break it somewhere
    assert float((err / bound).max()) > 0.5

    amax = w.abs().reshape(-1).new_zeros(grid)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in grid]).reshape(-1, len(grid)).tolist():
        *lead, i, j = idx
        amax[tuple(idx)] = w[(*lead, slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))].abs().max()
    if scale_fmt is None:
        torch.testing.assert_close(s, amax / FP8_MAX, rtol=2e-7, atol=0)
    else:
        assert torch.equal(s, torch.exp2(torch.log2(s).round())), "ue8m0 scales must be powers of two"
        assert bool((s >= amax / FP8_MAX).all()) and bool((s < 2 * amax / FP8_MAX).all())
    assert float(q.float().abs().max()) <= FP8_MAX


def test_576x7168_scale_grid_and_partial_last_block():
    """kv_a_proj_with_mqa: 576 rows -> 5 row blocks, the last one 64 rows (4 full + 1 partial)."""
    q = torch.ones(576, 7168).to(FP8_DTYPE)
    s = torch.arange(1, 5 * 56 + 1, dtype=torch.float32).reshape(5, 56)
    d = dequantize_blockwise(q, s, out_dtype=torch.float32)
    assert d.shape == (576, 7168)
    rows = torch.arange(576) // 128
    cols = torch.arange(7168) // 128
    assert torch.equal(d, s[rows][:, cols])
    assert float(d[575, 7167]) == 5 * 56 and float(d[512, 0]) == 4 * 56 + 1
    with pytest.raises(ValueError, match="scale grid"):
        dequantize_blockwise(q, torch.ones(4, 56))  # 576 // 128 = 4 is the wrong (floor) grid


def test_zero_block_and_nonfinite():
    w = torch.zeros(130, 260)
    w[:128, :128] = torch.randn(128, 128)
    q, s = quantize_blockwise(w, scale_fmt="ue8m0")
    assert float(s[1, 0]) == 1.0 and float(s[0, 2]) == 1.0  # all-zero blocks: scale 1
    assert float(q[128:].float().abs().sum()) == 0.0
    assert torch.equal(dequantize_blockwise(q, s, out_dtype=torch.float32)[:, 128:], w[:, 128:])
    w[3, 3] = float("inf")
    with pytest.raises(ValueError, match="inf/nan"):
        quantize_blockwise(w)


def test_tilewise_activation_quantization():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 300, generator=g) * (10.0 ** torch.randint(-2, 3, (3, 5, 1), generator=g).float())
    q, s = quantize_tilewise_act(x)
    assert q.shape == x.shape and s.shape == (3, 5, 3)
    for j, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 300)]):
        torch.testing.assert_close(s[..., j], x[..., lo:hi].abs().amax(-1) / FP8_MAX, rtol=2e-7, atol=0)
    d = dequantize_tilewise_act(q, s)
    full = s.repeat_interleave(128, -1)[..., :300]
    assert bool(((d - x).abs() <= e4m3_error_bound(x, full) * SLACK).all())
    _, s2 = quantize_tilewise_act(x, scale_fmt="ue8m0")
    assert torch.equal(s2, torch.exp2(torch.log2(s2).round()))


def test_round_scale_to_pow2_exact():
    s = torch.tensor([1.0, 0.75, 0.5, 3e-5, 2.0**-20, 5.0, 2.0**-126, 1.0000001])
    want = torch.tensor([1.0, 1.0, 0.5, 2.0**-15, 2.0**-20, 8.0, 2.0**-126, 2.0])
    assert torch.equal(round_scale_to_pow2(s), want)


def test_scale_dtypes_read_as_float32():
    ref = torch.tensor([[2.0**-10, 1.0], [4.0, 2.0**-3]])
    assert torch.equal(scale_to_float32(ref.to(torch.float8_e8m0fnu)), ref)
    assert torch.equal(scale_to_float32(torch.tensor([[117, 127], [129, 124]], dtype=torch.uint8)), ref)


# --- chunked, compiled and transposed quantizers (posttrain.fp8.quant kernels) ---------------------

import logging  # noqa: E402

from posttrain.fp8 import quant as Q  # noqa: E402


def _bits_equal(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("budget", [1 << 26, 5000, 200])
def test_chunked_quantizers_equal_the_reference_bit_for_bit(monkeypatch, budget):
    """Chunks are whole groups (experts, then row-groups), so chunking changes memory, never values;
    the transposed and re-tiling variants equal the reference composed by hand."""
    monkeypatch.setattr(Q, "QUANT_CHUNK_ELEMS", budget)
    monkeypatch.setenv(Q.QUANT_BACKEND_ENV, "eager")
    g = torch.Generator().manual_seed(5)
    for shape, group in [((300, 260), (1, 128)), ((300, 260), (128, 128)), ((3, 200, 260), (128, 128)),
                         ((2, 3, 130, 260), (128, 128)), ((5, 70), (1, 70))]:
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(shape, generator=g) * 10.0 ** torch.randint(-2, 3, shape[:-1] + (1,), generator=g)).to(dtype)
            assert _bits_equal(Q.quantize_groups(x, group, check_finite=False), Q.quantize_groups_reference(x, group, check_finite=False))
            got_t = Q.quantize_groups_t(x, group)
            assert _bits_equal(got_t, Q.quantize_groups_reference(x.transpose(-2, -1), group, check_finite=False))
    x = torch.randn(300, 260, generator=g)
    q, s = Q.quantize_groups_reference(x, (1, 128))
    want = Q.quantize_groups_reference(Q.dequantize_groups(q, s, (1, 128)).t(), (1, 128))
    assert _bits_equal(Q.requantize_tiles_t(q, s), want)
    rq, rs = Q.quantize_rows(x)
    assert rs.shape == (300,) and torch.equal(rs, x.abs().amax(-1) * (1 / FP8_MAX))
    with pytest.raises(ValueError, match="inf/nan"):
        x[7, 7] = float("nan")
        Q.quantize_groups(x, (128, 128))


def test_e4m3_step_distance_counts_representable_values():
    vals = torch.tensor([0.0, -0.0, 2.0**-9, 1.0, 1.125, 448.0, -1.0, -1.125, 240.0, 256.0])
    q = vals.to(FP8_DTYPE)
    d = Q.e4m3_step_distance(q[None, :], q[:, None])
    assert int(d[0, 1]) == 0  # +0 and -0
    assert int(d[0, 2]) == 1  # smallest subnormal is one step above zero
    assert int(d[3, 4]) == 1  # 1.0 -> 1.125 (3 mantissa bits)
    assert int(d[6, 7]) == 1 and int(d[3, 6]) == 2 * int(d[0, 3])  # symmetric around zero
    assert int(d[8, 9]) == 1  # 240 -> 256 across an exponent boundary
    assert int(d[0, 5]) == 126  # 448 is the 126th value above 0 (0x7E)


def test_compiled_quantizer_failure_falls_back_to_eager_once(monkeypatch, caplog):
    monkeypatch.setenv(Q.QUANT_BACKEND_ENV, "compiled")
    monkeypatch.setattr(Q, "_compile_state", {})

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    _assert_falls_back_to_eager_once(caplog, "torch.compile of the FP8 quantizer failed")


def _assert_falls_back_to_eager_once(caplog, warning: str) -> None:
    """Three quantizations after the backend fails: the reference's bits every time, the backend off for
    the process, one warning."""
    x = torch.randn(40, 300)
    with caplog.at_level(logging.WARNING, logger="posttrain.fp8.quant"):
        for _ in range(3):
            got = Q.quantize_groups(x, (1, 128), check_finite=False)
    assert _bits_equal(got, Q.quantize_groups_reference(x, (1, 128), check_finite=False))
    assert Q.quant_backend("cpu") == "eager"
    assert sum(warning in r.getMessage() for r in caplog.records) == 1


def test_quant_backend_selection(monkeypatch, caplog):
    from posttrain.fp8 import triton_quant

    monkeypatch.setattr(Q, "_compile_state", {})
    monkeypatch.setattr(Q, "_triton_state", {})
    checks = []
    monkeypatch.setattr(Q, "_triton_check", lambda device: checks.append(str(device)))  # passes (None)
    monkeypatch.setattr(triton_quant, "available", lambda: True)
    for mode, cpu, cuda in (("auto", "eager", "triton"), ("eager", "eager", "eager"),
                            ("compiled", "compiled", "compiled"), ("triton", "triton", "triton")):
        monkeypatch.setenv(Q.QUANT_BACKEND_ENV, mode)
        assert (Q.quant_backend("cpu"), Q.quant_backend("cuda")) == (cpu, cuda), mode
    assert checks == ["cuda"], "auto checks the Triton kernel once per device before using it"
    # without Triton, or when its start-up check fails, auto takes the compiled quantizer (warned once)
    monkeypatch.setenv(Q.QUANT_BACKEND_ENV, "auto")
    monkeypatch.setattr(triton_quant, "available", lambda: False)
    assert Q.quant_backend("cuda") == "compiled"
    monkeypatch.setattr(triton_quant, "available", lambda: True)
    monkeypatch.setattr(Q, "_triton_check", lambda device: "tiles 1x128 differs from the reference")
    with caplog.at_level(logging.WARNING, logger="posttrain.fp8.quant"):
        assert [Q.quant_backend("cuda:1") for _ in range(3)] == ["compiled"] * 3
    assert sum("start-up check" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv(Q.QUANT_BACKEND_ENV, "fast")
    with pytest.raises(ValueError):
        Q.quant_backend("cpu")


def test_a_failing_triton_kernel_falls_back_to_the_reference_once(monkeypatch, caplog):
    """E.g. POSTTRAIN_FP8_QUANT=triton on a CPU without the interpreter: the launch fails, the run goes on."""
    from posttrain.fp8 import triton_quant

    monkeypatch.setattr(Q, "_compile_state", {"broken": True})  # the fallback after Triton: eager here
    monkeypatch.setattr(Q, "_triton_state", {})
    monkeypatch.setenv(Q.QUANT_BACKEND_ENV, "triton")
    monkeypatch.setattr(triton_quant, "available", lambda: True)

    def no_driver(*a, **k):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(triton_quant, "quantize", no_driver)
    _assert_falls_back_to_eager_once(caplog, "Triton FP8 quantizer failed")


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(scope="session")
def compiled_vs_reference():
    """Every compiled kernel once per device (one compile each, shared by the tests below)."""
    import os

    cache: dict[str, dict[str, tuple]] = {}

    def run(device: str) -> dict[str, tuple]:
        if device in cache:
            return cache[device]
        old = os.environ.get(Q.QUANT_BACKEND_ENV)
        os.environ[Q.QUANT_BACKEND_ENV] = "compiled"
        saved_state = dict(Q._compile_state)
        Q._compile_state.clear()
        try:
            g = torch.Generator().manual_seed(11)
            # token magnitudes over 10^±3, heavy tails (subnormals), a partial last tile of 4 columns
            x = (torch.randn(300, 260, generator=g) * torch.rand(300, 260, generator=g) ** 4
                 * 10.0 ** torch.randint(-3, 4, (300, 1), generator=g)).to(device)
            w = _blocky_weight((3, 200, 260), seed=3).to(device)
            xb = x.to(torch.bfloat16)
            q, s = Q.quantize_groups_reference(x, (1, 128), check_finite=False)
            cases = {
                "tiles 1x128 bf16": (lambda: Q.quantize_groups(xb, (1, 128), check_finite=False),
                                     lambda: Q.quantize_groups_reference(xb, (1, 128), check_finite=False)),
                "tiles 1x128 ue8m0": (lambda: Q.quantize_groups(x, (1, 128), "ue8m0", check_finite=False),
                                      lambda: Q.quantize_groups_reference(x, (1, 128), "ue8m0", check_finite=False)),
                "blocks 128x128 [E,N,K]": (lambda: Q.quantize_groups(w, (128, 128), check_finite=False),
                                           lambda: Q.quantize_groups_reference(w, (128, 128), check_finite=False)),
                "rows [E,N,K] bf16": (lambda: Q.quantize_rows(w.to(torch.bfloat16)),
                                      lambda: (lambda r: (r[0], r[1].squeeze(-1)))(
                                          Q.quantize_groups_reference(w.to(torch.bfloat16), (1, 260), check_finite=False))),
                "transposed tiles (wgrad dY^T)": (lambda: Q.quantize_groups_t(xb, (1, 128)),
                                                  lambda: Q.quantize_groups_reference(xb.t(), (1, 128), check_finite=False)),
                "re-tile 1x128 -> 128x1 (wgrad X^T)": (lambda: Q.requantize_tiles_t(q, s),
                                                       lambda: Q.quantize_groups_reference(Q.dequantize_groups(q, s, (1, 128)).t(), (1, 128))),
            }
            out = {name: (got(), ref()) for name, (got, ref) in cases.items()}
            assert not Q._compile_state.get("broken"), "torch.compile failed: the eager fallback ran instead"
            kinds = {key[0] for key in Q._compile_state if isinstance(key, tuple)}
            assert kinds == {"groups", "groups_t", "requant_t"}, kinds
        finally:
            Q._compile_state.clear()
            Q._compile_state.update(saved_state)
            if old is None:
                os.environ.pop(Q.QUANT_BACKEND_ENV, None)
            else:
                os.environ[Q.QUANT_BACKEND_ENV] = old
        cache[device] = out
        return out

    return run


@pytest.mark.slow  # six torch.compile runs: ~60-120 s on a cold 2-core machine, ~25 s with a warm inductor cache
@pytest.mark.parametrize("device", _DEVICES)
def test_compiled_quantizers_match_the_reference_within_one_e4m3_step(compiled_vs_reference, device):
    """The rule for every compiled quantizer (activation 1x128, weight 128x128, row-wise, and the
    backward's transposed / re-tiled ones): scales identical; fp8 values identical or one e4m3 step
    apart (``e4m3_step_distance <= 1``), the most a one-ulp change of ``x / s`` can cause."""
    for name, ((q, s), (q_ref, s_ref)) in compiled_vs_reference(device).items():
        assert q.shape == q_ref.shape and q.dtype == FP8_DTYPE, name
        assert torch.equal(s, s_ref), f"{name}: scales differ"
        steps = Q.e4m3_step_distance(q, q_ref)
        assert int(steps.max()) <= 1, f"{name}: {int((steps > 1).sum())} values more than one e4m3 step off"
        assert float((steps > 0).float().mean()) < 0.01, name  # and off-by-one is a rare tie effect, not a habit


def test_expert_stack_quantization_memory_is_bounded_by_its_fp8_output(peak_rss):
    """Quantizing a [64, 512, 512] fp32 expert stack (64 MiB) adds at most its fp8 copy (16 MiB) plus
    24 MiB to the peak RSS: chunks of 2^18 elements need ~3 MiB of float32 temporaries, and the first
    torch ops of a fresh process cost ~7 MiB (measured: +23 MiB in all at 2^16, +25 at 2^18). The
    unchunked quantizer held a float32 abs() and then a float32 quotient of the whole stack: +85 MiB."""
    setup = (
        "import torch\n"
        "import posttrain.fp8.quant as Q\n"
        "from posttrain.fp8.linear import FP8Recipe, quantize_weight\n"
        "Q.QUANT_CHUNK_ELEMS = 1 << 18\n"
        "w = torch.randn(64, 512, 512)\n"
    )
    env = {"OMP_NUM_THREADS": "1", Q.QUANT_BACKEND_ENV: "eager"}
    base = peak_rss(setup, env=env)
    peak = peak_rss(setup + "wq = quantize_weight(w, FP8Recipe())\nassert wq.data.shape == w.shape\n", env=env)
    numel = 64 * 512 * 512
    extra = peak - base
    assert extra <= numel * 1 + 24 * 2**20, f"quantization added {extra / 2**20:.1f} MiB over {base / 2**20:.0f} MiB"
