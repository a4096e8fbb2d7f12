"""Fine-grained FP8 (e4m3) quantization math, DeepSeek-V3 style.

DeepSeek-V3 technical report, §3.3.2 "Improved Precision from Quantization and
Multiplication": scaling groups are 1x128 tiles for activations (per token, per 128
channels) and 128x128 blocks for weights; scales are computed online from the group's
max-abs value, and every tensor uses E4M3 ("mantissa over exponents").

Conventions used everywhere in ``posttrain.fp8``:

* ``scale_inv`` is the *dequantization* multiplier, as stored in DeepSeek checkpoints
  (``weight_scale_inv``): ``w ≈ fp8.float() * scale_inv`` broadcast over the group.
* Groups are ceil-divided: the last block along a dimension that is not a multiple of
  the block size is partial (``kv_a_proj_with_mqa`` is 576 x 7168 -> a 5 x 56 grid).
  transformers' dequantizer infers the block as ``rows // scale_rows`` and gets this
  wrong; nothing here infers the block from the scale shape.
* ``scale_inv = amax / 448`` per group, computed as ``amax * float32(1/448)``: CUDA's eager division by a
  scalar and Inductor's already compute that product, and an explicit product gives the same bits on every
  device and backend (IEEE division would differ by one ulp in about half the groups on CUDA). A group
  whose amax is 0 gets ``scale_inv = 1``
  (any positive value gives all-zero fp8; 1 is also a power of two, so it is valid for
  ``ue8m0``). Scales are clamped below at the smallest normal fp32 so tiny-but-nonzero
  groups never divide by zero.
* ``scale_fmt="ue8m0"`` (DeepSeek-V3.1; ``quantization_config.scale_fmt`` in the
  checkpoint config, which vLLM reads to turn on DeepGEMM's UE8M0 path) rounds every
  scale *up* to a power of two, so ``|w / scale_inv| <= 448`` still holds. The scale is
  still stored as float32.
"""

from __future__ import annotations

import logging
import math
import os
import types
from collections.abc import Callable, Sequence

import torch

from ..start_up_check import device_key

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INV_FP8_MAX = 1.0 / FP8_MAX  # scales are amax * float32(1/448) on every backend (see the module docstring)
DEFAULT_BLOCK = (128, 128)
DEFAULT_TILE = 128
SCALE_FMTS = (None, "ue8m0")

_FP32_TINY = torch.finfo(torch.float32).tiny


def scale_grid_shape(shape: Sequence[int], block: Sequence[int] = DEFAULT_BLOCK) -> tuple[int, ...]:
    """Shape of the scale grid for a tensor of ``shape`` quantized in ``block`` groups over its last two dims.

    Leading dimensions (e.g. the expert dimension of a fused [E, out, in] tensor) are kept.
    """
    if len(shape) < 2:
        raise ValueError(f"block quantization needs a >= 2-D tensor, got shape {tuple(shape)}")
    br, bc = int(block[0]), int(block[1])
    return (*shape[:-2], math.ceil(shape[-2] / br), math.ceil(shape[-1] / bc))


def _check_scale_fmt(scale_fmt: str | None) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def round_scale_to_pow2(scale_inv: torch.Tensor) -> torch.Tensor:
    """Round positive scales *up* to the next power of two (UE8M0), exactly.

    ``frexp`` gives ``s = m * 2**e`` with ``m`` in [0.5, 1); ``s`` is already a power of
    two iff ``m == 0.5``. This avoids the off-by-one that ``ceil(log2(s))`` can hit when
    ``log2`` rounds.
    """
    mantissa, exponent = torch.frexp(scale_inv)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(scale_inv), exponent)


def _pad_to_blocks(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    rows, cols = x.shape[-2], x.shape[-1]
    pr, pc = (-rows) % br, (-cols) % bc
    if pr == 0 and pc == 0:
        return x
    return torch.nn.functional.pad(x, (0, pc, 0, pr))


def compute_scale_inv(
    amax: torch.Tensor, scale_fmt: str | None = None, *, check_finite: bool = True
) -> torch.Tensor:
    """Dequantization scales from per-group max-abs values (float32)."""
    _check_scale_fmt(scale_fmt)
    amax = amax.float()
    if check_finite and not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantize a tensor with inf/nan values to fp8")
    scale_inv = (amax * INV_FP8_MAX).clamp_min(_FP32_TINY)
    scale_inv = torch.where(amax > 0, scale_inv, torch.ones_like(scale_inv))
    if scale_fmt == "ue8m0":
        scale_inv = round_scale_to_pow2(scale_inv)
    return scale_inv


def quantize_groups_reference(
    x: torch.Tensor,
    group: Sequence[int],
    scale_fmt: str | None = None,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager reference quantizer: the definition every faster path is tested against.

    Quantizes the last two dims of ``x`` in ``group = (rows, cols)`` groups (ceil-divided); returns
    ``(fp8, scale_inv)`` with ``fp8.shape == x.shape`` and ``scale_inv.shape ==
    scale_grid_shape(x.shape, group)`` (float32). Math runs in float32 whatever the input dtype. It
    materializes float32 temporaries of the whole input: :func:`quantize_groups` calls it per chunk.
    """
    rows, cols = x.shape[-2], x.shape[-1]
    q, scale_inv = _quantize_padded(x, int(group[0]), int(group[1]), scale_fmt, check_finite)
    if q.shape[-2] != rows or q.shape[-1] != cols:
        q = q[..., :rows, :cols].contiguous()
    return q, scale_inv


def _quantize_padded(x: torch.Tensor, br: int, bc: int, scale_fmt: str | None, check_finite: bool):
    """The reference math; fp8 comes back padded to whole groups (the caller crops)."""
    lead = x.shape[:-2]
    xf = _pad_to_blocks(x.float(), br, bc)
    gr, gc = xf.shape[-2] // br, xf.shape[-1] // bc
    xv = xf.reshape(*lead, gr, br, gc, bc)
    amax = xv.abs().amax(dim=(-3, -1))
    scale_inv = compute_scale_inv(amax, scale_fmt, check_finite=check_finite)
    # Division (not multiplication by a reciprocal) keeps the amax element at exactly
    # ±448 before rounding; the clamp guards against cast behaviours that do not saturate.
    q = (xv / scale_inv[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(*lead, gr * br, gc * bc), scale_inv


def quantize_groups(
    x: torch.Tensor,
    group: Sequence[int],
    scale_fmt: str | None = None,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last two dims of ``x`` in ``group = (rows, cols)`` groups (ceil-divided).

    Returns ``(fp8, scale_inv)`` with ``fp8.shape == x.shape`` and
    ``scale_inv.shape == scale_grid_shape(x.shape, group)`` (float32), equal to
    :func:`quantize_groups_reference`. Large inputs are processed in chunks of whole groups (over the
    leading dims, e.g. one expert at a time, then over row-groups), so the float32 temporaries are
    bounded by ``QUANT_CHUNK_ELEMS`` elements instead of the size of ``x`` -- a [256, 4096, 7168] expert
    stack needed 28 GiB for its ``abs()`` alone. With ``check_finite=False`` (the training path) the
    kernel is the Triton one or the ``torch.compile``'d reference where :func:`quant_backend` says so.
    """
    return _chunked(x, (int(group[0]), int(group[1])), scale_fmt, check_finite, transpose=False)


def quantize_groups_t(
    x: torch.Tensor, group: Sequence[int], scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_groups(x.transpose(-2, -1), group)`` without materializing the transpose in high precision.

    The wgrad GEMM contracts over tokens, so it needs dY^T quantized in 1x128 tiles along the token
    dim (report §3.3.2: 128x1 tiles of dY); the fused kernel reads dY once and writes the fp8 transpose.
    """
    return _chunked(x, (int(group[0]), int(group[1])), scale_fmt, False, transpose=True)


def requantize_tiles_t(
    q: torch.Tensor, scale_inv: torch.Tensor, tile: int = DEFAULT_TILE, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """From an fp8 ``[M, K]`` tensor in 1 x ``tile`` tiles (the cached forward activation), the fp8 ``[K, M]``
    transpose in 1 x ``tile`` tiles along M, i.e. the 128x1 tiles the wgrad GEMM needs (report §3.3.3
    "Low-Precision Storage" and §3.5.2 on converting 1x128 tiles to 128x1 in the backward).

    Equals ``quantize_groups(dequantize_groups(q, s, (1, tile)).t(), (1, tile))``; fused, it never writes
    the float32 activation.
    """
    if q.dim() != 2:
        raise ValueError(f"requantize_tiles_t expects a 2-D tensor, got {tuple(q.shape)}")
    k = q.shape[1]
    chunk_rows = _chunk_rows(k, q.shape[0], tile)
    if chunk_rows >= k or _triton_takes_whole("requant_t", tile, tile, q):
        return _run("requant_t", tile, tile, scale_fmt, q, scale_inv)
    # chunk over K in whole input tiles: output rows [k0, k1) read input columns [k0, k1) and scale columns k0/tile...
    m = q.shape[0]
    out_q = torch.empty(k, m, dtype=FP8_DTYPE, device=q.device)
    out_s = torch.empty(k, math.ceil(m / tile), dtype=torch.float32, device=q.device)
    for k0 in range(0, k, chunk_rows):
        k1 = min(k, k0 + chunk_rows)
        cq, cs = _run("requant_t", tile, tile, scale_fmt, q[:, k0:k1], scale_inv[:, k0 // tile : math.ceil(k1 / tile)])
        out_q[k0:k1], out_s[k0:k1] = cq, cs
    return out_q, out_s


def quantize_tiles_and_t(
    x: torch.Tensor, tile: int = DEFAULT_TILE, scale_fmt: str | None = None, *, requantize: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Both operands an FP8 linear makes of one activation-side matrix ``x`` [M, K], from one read of it:
    ``x`` in 1 x ``tile`` tiles (the forward's X, the dgrad's dY) and ``x^T`` [K, M] in 1 x ``tile`` tiles along M
    (the wgrad's 128x1 tiles of X or dY, report §3.3.2).

    ``requantize=False`` (dY): equals ``(quantize_groups(x, (1, tile)), quantize_groups_t(x, (1, tile)))``.
    ``requantize=True`` (X): the transpose is made from the fp8 tiles, as the report's backward converts the
    cached 1x128 activation to 128x1 tiles (§3.5.2): equals ``requantize_tiles_t(*first)``. Bit for bit either
    way; on the Triton backend it is one kernel, elsewhere the two calls.
    """
    _check_scale_fmt(scale_fmt)
    got = _one_read(x, tile, scale_fmt, requantize)
    if got is not None:
        return got
    first = quantize_groups(x, (1, tile), scale_fmt, check_finite=False)
    second = requantize_tiles_t(*first, tile, scale_fmt) if requantize else quantize_groups_t(x, (1, tile), scale_fmt)
    return first, second


def quantize_rows(x: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise quantization (one scale per row of the last two dims): ``(fp8, scale_inv [..., rows])``.

    The scaling torch's grouped FP8 GEMM takes (``ScalingType.RowWise``); coarser than the report's
    1x128 / 128x128 groups (§3.3.2), used only where no block-scaled grouped kernel exists.
    """
    q, s = quantize_groups(x, (1, x.shape[-1]), scale_fmt, check_finite=False)
    return q, s.squeeze(-1)


# --- chunking, the compiled kernels and the Triton ones ----------------------------------------------
#
# Each kernel below is the eager reference math written as a function of tensors and Python constants,
# so that ``torch.compile`` (Inductor: Triton on CUDA, C++ on CPU) turns it into one or two fused passes
# over memory. posttrain.fp8.triton_quant writes the same math as one hand-written Triton kernel. The
# eager reference is what runs unless quant_backend() says otherwise. The rule, checked by
# tests/test_fp8_quant.py: compiled results equal the reference bit for bit or differ by at most one
# e4m3 step (see e4m3_step_distance), with identical scales; the Triton kernel equals it bit for bit.

QUANT_CHUNK_ELEMS = 1 << 26  # elements per chunk: bounds the eager path's float32 temporaries (~256 MiB each)
QUANT_BACKEND_ENV = "POSTTRAIN_FP8_QUANT"  # "auto" (Triton, else compiled, on CUDA), "eager", "compiled", "triton"
QUANT_BACKENDS = ("auto", "eager", "compiled", "triton")

_compile_state: dict[str, object] = {}
_triton_state: dict[str, object] = {}  # "broken": the kernel failed or its start-up check did not pass


def _chunk_rows(lead: int, cols: int, br: int) -> int:
    """Rows (a multiple of ``br``) per chunk so that one chunk holds about QUANT_CHUNK_ELEMS elements."""
    per = max(1, QUANT_CHUNK_ELEMS // max(1, cols))
    return max(br, per // br * br)


def _chunked(x: torch.Tensor, group: tuple[int, int], scale_fmt: str | None, check_finite: bool, transpose: bool):
    _check_scale_fmt(scale_fmt)
    if x.dim() < 2:
        raise ValueError(f"block quantization needs a >= 2-D tensor, got shape {tuple(x.shape)}")
    br, bc = group
    # shape of the tensor being quantized (x, or x^T)
    rows, cols = (x.shape[-1], x.shape[-2]) if transpose else (x.shape[-2], x.shape[-1])
    lead = tuple(x.shape[:-2])
    kind = "groups_t" if transpose else "groups"
    if x.numel() <= QUANT_CHUNK_ELEMS or (not check_finite and _triton_takes_whole(kind, br, bc, x)):
        return _run(kind, br, bc, scale_fmt, x, check_finite=check_finite)
    q = torch.empty(*lead, rows, cols, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(*lead, math.ceil(rows / br), math.ceil(cols / bc), dtype=torch.float32, device=x.device)
    per_matrix = rows * cols
    if lead and per_matrix <= QUANT_CHUNK_ELEMS:
        # whole matrices (experts) per chunk
        xf, qf, sf = x.reshape(-1, *x.shape[-2:]), q.view(-1, rows, cols), s.view(-1, *s.shape[-2:])
        n = max(1, QUANT_CHUNK_ELEMS // per_matrix)
        for e0 in range(0, xf.shape[0], n):
            qf[e0 : e0 + n], sf[e0 : e0 + n] = _run(kind, br, bc, scale_fmt, xf[e0 : e0 + n], check_finite=check_finite)
        return q, s
    # row-groups of one matrix at a time
    step = _chunk_rows(rows, cols, br)
    for idx in _lead_indices(lead):
        xm, qm, sm = x[idx], q[idx], s[idx]
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            part = xm[..., r0:r1] if transpose else xm[r0:r1]
            qm[r0:r1], sm[r0 // br : math.ceil(r1 / br)] = _run(kind, br, bc, scale_fmt, part, check_finite=check_finite)
    return q, s


def _triton_takes_whole(kind: str, br: int, bc: int, x: torch.Tensor) -> bool:
    """The Triton kernel makes no float32 temporaries, so a tensor it reads in place needs no chunks: one
    launch instead of one per chunk, and no copy of each chunk's output into the result."""
    if _is_compiling() or quant_backend(x.device) != "triton":
        return False
    from posttrain.fp8 import triton_quant

    return triton_quant.in_place(kind, br, bc, x)


def _lead_indices(lead: tuple[int, ...]):
    if not lead:
        yield ()
        return
    for flat in range(math.prod(lead)):
        idx, rem = [], flat
        for d in reversed(lead):
            idx.append(rem % d)
            rem //= d
        yield tuple(reversed(idx))


def _reference(kind: str, a: int, b: int, scale_fmt: str | None, tensors: tuple, check_finite: bool = False):
    """The eager kernels (padded fp8 out): ``groups`` quantizes x in a x b groups, ``groups_t`` quantizes
    x^T, ``requant_t`` re-tiles an fp8 tensor in 1 x a tiles to its transpose in 1 x a tiles."""
    if kind == "groups":
        return _quantize_padded(tensors[0], a, b, scale_fmt, check_finite)
    if kind == "groups_t":
        return _quantize_padded(tensors[0].transpose(-2, -1), a, b, scale_fmt, check_finite)
    q, s = tensors
    x = dequantize_groups(q, s, (1, a), torch.float32)
    return _quantize_padded(x.t(), 1, a, scale_fmt, check_finite)


def _kernel_fn(kind: str, a: int, b: int, scale_fmt: str | None):
    """The same math with the group sizes and the scale format as constants (closure cells)."""
    if kind == "requant_t":
        def kernel(q, s):
            return _reference("requant_t", a, b, scale_fmt, (q, s))
    else:
        def kernel(x):
            return _reference(kind, a, b, scale_fmt, (x,))
    return kernel


def _compiled_kernel(kind: str, a: int, b: int, scale_fmt: str | None):
    """``torch.compile`` of one kernel configuration, built once per process.

    Each configuration gets a code object of its own: Dynamo keeps its compiled graphs, its
    recompilation count and its automatic-dynamic state per code object, so group sizes stay
    compile-time constants (a 1x128 and a 128x128 call through one code object would turn them into
    symbolic sizes) and only the tensors' shapes go dynamic (static first, dynamic after a second shape).
    The kernels return the fp8 padded to whole groups and the caller crops it: with the crop inside the
    compiled graph, torch 2.13's C++ (CPU) backend wrote wrong values into a partial last tile of 4
    columns (found by the compiled-vs-reference test).
    """
    key = (kind, a, b, scale_fmt)
    compiled = _compile_state.get(key)
    if compiled is None:
        fn = _kernel_fn(*key)
        code = fn.__code__.replace(co_name=f"fp8_quant_{kind}_{a}x{b}_{scale_fmt or 'f32'}")
        fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        compiled = _compile_state[key] = torch.compile(fn, fullgraph=True)
    return compiled


def _quant_mode() -> str:
    mode = os.environ.get(QUANT_BACKEND_ENV, "auto")
    if mode not in QUANT_BACKENDS:
        raise ValueError(f"{QUANT_BACKEND_ENV} must be one of {', '.join(QUANT_BACKENDS)}, got {mode!r}")
    return mode


def quant_backend(device: torch.device | str, mode: str | None = None) -> str:
    """``"triton"``, ``"compiled"`` or ``"eager"``: which quantizer :func:`quantize_groups` & co. use on ``device``.

    ``POSTTRAIN_FP8_QUANT=auto`` (default) picks on CUDA the Triton kernels of
    :mod:`posttrain.fp8.triton_quant` (one pass over memory, bit-identical to the reference) after their
    start-up check, else ``torch.compile`` of the reference; on a CPU it picks eager (the first compile of
    each kernel costs tens of seconds there, and the CPU path is an emulation anyway). ``compiled`` and
    ``triton`` force that backend (on a CPU, ``triton`` needs ``TRITON_INTERPRET=1``); ``eager`` never
    compiles. A failure switches to the next backend for the rest of the process, logged once; group
    shapes the Triton kernels do not cover use the compiled kernel. ``mode``: the variable's value, if the
    caller has read it.
    """
    mode = _quant_mode() if mode is None else mode
    if mode == "eager":
        return "eager"
    device = torch.device(device)
    if mode == "auto" and device.type != "cuda":
        return "eager"
    if mode in ("auto", "triton") and _triton_usable(device, probe=mode == "auto"):
        return "triton"
    if _compile_state.get("broken") or not hasattr(torch, "compile"):
        return "eager"
    return "compiled"


def _triton_usable(device: torch.device, probe: bool) -> bool:
    from posttrain.fp8 import triton_quant

    if not triton_quant.available() or _triton_state.get("broken"):
        return False
    if probe and device.type == "cuda":
        key = ("probed", device_key(device))
        if key not in _triton_state:
            _triton_state[key] = True  # set first: the check itself calls the kernels directly
            problem = _triton_check(device)
            if problem:
                log.warning("the Triton FP8 quantizer failed its start-up check on %s (%s); using the compiled one",
                            device, problem)
                _triton_state["broken"] = True
                return False
    return True


def _triton_check(device: torch.device) -> str | None:
    """Each Triton layout against the eager reference on small tensors with partial tiles: bits must match."""
    from posttrain.fp8 import triton_quant

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, 300, generator=g) * 10.0 ** torch.randint(-3, 4, (200, 1), generator=g)).to(device)
    xb = x.to(torch.bfloat16)
    q, s = _quantize_padded(x, 1, 128, None, False)
    q = q[:, :300].contiguous()
    cases = [("groups", 1, 128, None, (xb,)), ("groups", 128, 128, None, (x,)), ("groups", 1, 128, "ue8m0", (x,)),
             ("groups", 1, 300, None, (xb,)), ("groups", 1, 200, None, (xb.t(),)),  # rows of x, of x^T read from x
             ("groups_t", 1, 128, None, (xb,)), ("requant_t", 128, 128, None, (q, s))]
    try:
        for kind, a, b, fmt, tensors in cases:
            if not _bits_match(triton_quant.quantize(kind, a, b, fmt, *tensors), _reference(kind, a, b, fmt, tensors)):
                return f"{kind} {a}x{b} {fmt or 'fp32 scales'} differs from the reference"
        from posttrain.fp8.experts import quantize_token_runs_reference, quantize_token_runs_triton

        counts = torch.tensor([40, 0, 123, 37], device=device)  # an expert without tokens, unaligned runs
        if not _bits_match(quantize_token_runs_triton(xb, counts), quantize_token_runs_reference(xb, counts)):
            return "the grouped wgrad's token runs differ from the reference"
        xq, xs = _quantize_padded(xb, 1, 300, None, False)  # the row-wise fp8 cache, dequantized in the kernel
        if not _bits_match(quantize_token_runs_triton(xq, counts, None, xs.squeeze(-1)),
                           quantize_token_runs_reference(xq, counts, None, xs.squeeze(-1))):
            return "the grouped wgrad's token runs from the fp8 cache differ from the reference"
    except Exception as e:  # noqa: BLE001 -- no driver, no compiler, ...: the compiled path still works
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _one_read_check(device: torch.device) -> str | None:
    """The one-read kernel (both tilings, both variants) against the reference on a tensor with partial tiles."""
    from posttrain.fp8 import triton_quant

    g = torch.Generator().manual_seed(1)
    xb = (torch.randn(200, 300, generator=g) * 10.0 ** torch.randint(-3, 4, (200, 1), generator=g)).to(device)
    xb = xb.to(torch.bfloat16)
    first = _quantize_padded(xb, 1, 128, None, False)
    first = (first[0][:, :300].contiguous(), first[1])
    for requantize in (False, True):
        got = triton_quant.quantize_both(xb, 128, None, requantize)
        second = _reference("requant_t", 128, 128, None, first) if requantize else _reference("groups_t", 1, 128, None, (xb,))
        if not all(_bits_match(g, w) for g, w in zip(got, (first, second))):
            return f"requantize={requantize} differs from the reference"
    return None


def _bits_match(got: tuple, want: tuple) -> bool:
    """A kernel's outputs against the eager reference's: fp8 as bytes (the reference's, padded to whole groups,
    cropped to the kernel's shape), scales and offsets exactly."""
    def raw(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if t.dtype != FP8_DTYPE:
            return t
        return t[..., : like.shape[-2], : like.shape[-1]].contiguous().view(torch.uint8)

    return len(got) == len(want) and all(torch.equal(raw(g, g), raw(w, g)) for g, w in zip(got, want))


def _one_read(x: torch.Tensor, tile: int, scale_fmt: str | None, requantize: bool):
    """:func:`quantize_tiles_and_t` as one Triton kernel, or None: not the Triton backend, a shape the kernel does
    not cover, or the kernel failed its start-up check or a launch. A failure turns off this kernel only (logged
    once); the two separate Triton kernels still run."""
    if x.dim() != 2 or _triton_state.get("one read off") or _is_compiling():
        return None
    mode = _quant_mode()
    if quant_backend(x.device, mode) != "triton":
        return None
    from posttrain.fp8 import triton_quant

    try:
        # checked where quant_backend() checks the other kernels: on CUDA, when the backend is "auto"
        if mode == "auto" and x.device.type == "cuda":
            key = ("one read probed", device_key(x.device))
            if key not in _triton_state:
                _triton_state[key] = True
                problem = _one_read_check(x.device)
                if problem:
                    raise RuntimeError(f"start-up check: {problem}")
        return triton_quant.quantize_both(x, tile, scale_fmt, requantize)
    except Exception as e:  # noqa: BLE001 -- the separate kernels are correct without it
        log.warning("the one-read Triton FP8 quantizer is off (%s: %s); quantizing the two tilings separately",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        _triton_state["one read off"] = True
        return None


def _run(kind: str, a: int, b: int, scale_fmt: str | None, *tensors: torch.Tensor, check_finite: bool = False):
    """One chunk through the Triton kernel, the compiled kernel or the eager reference; the fp8 is cropped
    to the quantized tensor's shape and returned row-major."""
    x = tensors[0]
    rows, cols = (x.shape[-2], x.shape[-1]) if kind == "groups" else (x.shape[-1], x.shape[-2])
    backend = "eager" if check_finite or _is_compiling() else quant_backend(x.device)
    if backend == "triton":
        from posttrain.fp8 import triton_quant

        got = run_triton(lambda: triton_quant.quantize(kind, a, b, scale_fmt, *tensors))
        if got is not None:
            return got
        backend = "eager" if _compile_state.get("broken") else "compiled"
    if backend == "eager":
        q, s = _reference(kind, a, b, scale_fmt, tensors, check_finite)
    else:
        try:
            q, s = _compiled_kernel(kind, a, b, scale_fmt)(*tensors)
        except Exception as e:  # noqa: BLE001 -- compiler missing, unsupported op, ...: eager is always correct
            if not _compile_state.get("broken"):
                log.warning("torch.compile of the FP8 quantizer failed (%s: %s); using the eager quantizer",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _compile_state["broken"] = True
            q, s = _reference(kind, a, b, scale_fmt, tensors)
    if q.shape[-2] != rows or q.shape[-1] != cols:
        q = q[..., :rows, :cols]
    # always row-major: checkpoints need contiguous tensors, and the GEMMs' operand layouts start from it
    # (elementwise ops keep a transposed input's strides when the group reshape is a view, e.g. row-wise)
    return q.contiguous(), s


def run_triton(kernel: Callable[[], tuple | None]) -> tuple | None:
    """``kernel()`` (a call into posttrain.fp8.triton_quant), or None if it raised: the Triton backend is then
    off for the rest of the process (logged once) and callers take their compiled or eager path."""
    try:
        return kernel()
    except Exception as e:  # noqa: BLE001 -- e.g. no GPU driver for these tensors: the other backends still work
        log.warning("the Triton FP8 quantizer failed (%s: %s); using the compiled or eager one",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        _triton_state["broken"] = True
        return None


def _is_compiling() -> bool:
    # inside an outer torch.compile the eager reference is traced and fused into the caller's graph
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def e4m3_step_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many e4m3 values lie between ``a`` and ``b`` (int32, elementwise; 0 = same value, +0 == -0).

    e4m3fn's bit patterns, read as sign-magnitude integers, are ordered like the values they encode,
    so the step distance is the difference of the signed 7-bit magnitudes. The compiled quantizers must
    satisfy ``e4m3_step_distance(compiled, reference) <= 1`` everywhere (a float32 ``x / s`` computed as
    ``x * (1 / s)`` can move a value across a rounding boundary by one step, never more).
    """
    def signed(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.uint8).to(torch.int32)
        mag = bits & 0x7F
        return torch.where(bits >= 0x80, -mag, mag)

    return (signed(a) - signed(b)).abs()


def expand_scale(scale_inv: torch.Tensor, shape: Sequence[int], group: Sequence[int]) -> torch.Tensor:
    """Broadcast a group scale grid to a full ``shape`` tensor (float32), cropping partial groups."""
    br, bc = int(group[0]), int(group[1])
    expected = scale_grid_shape(shape, group)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale grid {tuple(scale_inv.shape)} does not match tensor {tuple(shape)} with group {br}x{bc} "
            f"(expected {expected})"
        )
    s = scale_inv.float()
    if br > 1:
        s = s.repeat_interleave(br, dim=-2)
    if bc > 1:
        s = s.repeat_interleave(bc, dim=-1)
    return s[..., : shape[-2], : shape[-1]]


def dequantize_groups(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    group: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: ``q.float() * scale_inv`` per group, cast to ``out_dtype``."""
    br, bc = int(group[0]), int(group[1])
    rows, cols = q.shape[-2], q.shape[-1]
    expected = scale_grid_shape(q.shape, group)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale grid {tuple(scale_inv.shape)} does not match tensor {tuple(q.shape)} with group {br}x{bc} "
            f"(expected {expected})"
        )
    s = scale_to_float32(scale_inv)
    if rows % br == 0 and cols % bc == 0:
        lead = q.shape[:-2]
        x = q.to(torch.float32, copy=True).reshape(*lead, rows // br, br, cols // bc, bc)
        x.mul_(s[..., :, None, :, None])
        x = x.reshape(q.shape)
    else:
        x = q.to(torch.float32, copy=True).mul_(expand_scale(s, q.shape, group))
    return x if out_dtype == torch.float32 else x.to(out_dtype)


def scale_to_float32(scale_inv: torch.Tensor) -> torch.Tensor:
    """Scales as float32, accepting float32/bf16, ``float8_e8m0fnu`` and raw UE8M0 bytes (``uint8``)."""
    if scale_inv.dtype == torch.uint8:  # MX-style biased exponent bytes
        return torch.ldexp(torch.ones_like(scale_inv, dtype=torch.float32), scale_inv.to(torch.int32) - 127)
    return scale_inv.float()


def scale_from_float32(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scales stored as ``dtype``: the inverse of :func:`scale_to_float32`. Raw UE8M0 bytes
    (``uint8``) hold the biased exponent of a power of two, not the value."""
    if dtype == torch.uint8:
        exponent = torch.frexp(scale.float()).exponent - 1  # scale = 2**exponent for a power of two
        return (exponent + 127).clamp(0, 254).to(torch.uint8)
    return scale.to(dtype)


# --- the two granularities of the report (§3.3.2) -------------------------------------------


def quantize_blockwise(
    w: torch.Tensor,
    block: Sequence[int] = DEFAULT_BLOCK,
    scale_fmt: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[..., out, in]`` in 128x128 blocks -> ``(fp8, weight_scale_inv)``.

    ``weight_scale_inv`` is float32 of shape ``[..., ceil(out/128), ceil(in/128)]``.
    Raises ``ValueError`` on inf/nan (a diverged weight must not be exported silently).
    """
    return quantize_groups(w, block, scale_fmt)


def dequantize_blockwise(
    fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: Sequence[int] = DEFAULT_BLOCK,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize a block-quantized weight: ``fp8.float() * scale_inv`` per block, as ``out_dtype``."""
    return dequantize_groups(fp8, scale_inv, block, out_dtype)


def quantize_tilewise_act(
    x: torch.Tensor,
    tile: int = DEFAULT_TILE,
    scale_fmt: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``[..., K]`` in 1 x ``tile`` tiles along the last dim (per token, per 128 channels).

    Returns ``(fp8 [..., K], scale_inv [..., ceil(K/tile)])``. No finiteness check (it
    would force a device sync on every call in training).
    """
    shape = x.shape
    q, s = quantize_groups(x.reshape(-1, shape[-1]), (1, tile), scale_fmt, check_finite=False)
    return q.reshape(shape), s.reshape(*shape[:-1], s.shape[-1])


def dequantize_tilewise_act(
    q: torch.Tensor, scale_inv: torch.Tensor, tile: int = DEFAULT_TILE, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_tilewise_act`."""
    shape = q.shape
    x = dequantize_groups(q.reshape(-1, shape[-1]), scale_inv.reshape(-1, scale_inv.shape[-1]), (1, tile), out_dtype)
    return x.reshape(shape)


def e4m3_error_bound(x: torch.Tensor, scale_inv_full: torch.Tensor) -> torch.Tensor:
    """Worst-case |dequant(quant(x)) - x| for round-to-nearest e4m3 with the given per-element scale.

    Normals (|x/s| >= 2**-6): half an ulp, at most 2**-4 of the value (3 mantissa bits).
    Subnormals: half the subnormal spacing 2**-9, i.e. 2**-10 times the scale.
    """
    return torch.maximum(x.abs().float() * 2.0**-4, scale_inv_full.float() * 2.0**-10)
