"""posttrain.triton_rounding.round_to_bf16: float32 rounded to bf16 on the bits, NaN kept NaN.

NVIDIA GPUs write every float32 NaN an instruction produces as 0x7FFFFFFF (the canonical NaN); NumPy's and
torch's NaN on a CPU is 0x7FC00000. Rounding on the bits, ``bits + 0x7FFF + lsb`` carries out of
0x7FFFFFFF into the sign bit (-0.0) and out of 0xFFFFFFFF to +0.0, so a NaN became a zero on the GPU while
the interpreter tests, fed NumPy's NaN, saw it survive. The cases here feed those bit patterns directly.

Without a GPU the kernels run under Triton's CPU interpreter in a fresh process (``python
tests/test_triton_rounding.py`` with ``TRITON_INTERPRET=1``, one JSON line); on CUDA the same cases run
compiled (``-m gpu``).
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from subprocess_env import run_in_triton_interpreter  # noqa: E402

from posttrain.triton_rounding import round_to_bf16, tl, triton  # triton None on a CPU install without it

# float32 NaNs: the GPU's canonical one and its negation, NumPy's / torch's and the x86 default (negative),
# signalling ones with the smallest payloads (rounding them must not turn them into infinities)
NAN_BITS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7F808000, 0x7FFF8000]


def _from_bits(bits: list[int]) -> torch.Tensor:
    """float32 tensor of the given raw bit patterns (unsigned 32-bit ints)."""
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def _finite_inputs() -> torch.Tensor:
    """Values whose bf16 rounding has a known answer: ties both ways, neighbours of ties, bf16's largest
    and the values past it (round to infinity), infinities, zeros of both signs, subnormals."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(256, generator=g) * 10.0 ** torch.randint(-30, 30, (256,), generator=g)
    bits = base.view(torch.int32) & -65536  # bf16 values; adding 0x8000 gives their ties
    ties = torch.cat([bits + 0x8000, bits + 0x7FFF, bits + 0x8001, bits + 0x18000]).view(torch.float32)
    special = _from_bits([0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0, 0x80000000,
                          0x00000001, 0x80008000, 0x00018000, 0x007FFFFF])
    return torch.cat([base, ties, special])


if triton is not None:

    @triton.jit
    def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out = round_to_bf16(x), float32 in and out (its bits are what the test checks)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, round_to_bf16(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def run_cases(device: str) -> dict:
    from posttrain import lm_loss

    def rounded(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        out = torch.empty_like(x)
        _round_kernel[(triton.cdiv(x.numel(), 128),)](x, out, x.numel(), BLOCK=128)
        return out.cpu()

    finite = _finite_inputs()
    want = finite.to(torch.bfloat16).float()
    got = rounded(finite)
    nans = rounded(_from_bits(NAN_BITS))
    nan_bits = nans.view(torch.int32)
    # a production kernel: lm_loss's x * scale in fp32, rounded once to bf16 (the backward's loss scaling); a NaN
    # scale with the GPU's bit pattern makes every product that NaN, in the interpreter too
    scaled = {}
    x = torch.randn(300, device=device).to(torch.bfloat16)
    for b in (0x7FFFFFFF, 0xFFFFFFFF):
        out = lm_loss._scaled(x, _from_bits([b]).reshape(()).to(device), kernel="triton").cpu()
        scaled[hex(b)] = int(out.isnan().sum())
    return {
        # bits the hardware's cvt.rn.bf16.f32 (torch's cast) writes, for every non-NaN input
        "finite equal torch's cast": bool(torch.equal(got.view(torch.int32), want.view(torch.int32))),
        "nan in": len(NAN_BITS),
        "nan out": int(nans.isnan().sum()),
        "nan sign kept": bool(torch.equal(nan_bits < 0, _from_bits(NAN_BITS).view(torch.int32) < 0)),
        "nan exact in bf16": bool((nan_bits & 0xFFFF == 0).all()),  # the cast after it stays exact
        "scaled bf16 NaN": scaled,
        "scaled n": x.numel(),
    }


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if triton is None:
        pytest.skip("no Triton")
    return run_in_triton_interpreter(__file__)


def _assert_rounding(r: dict) -> None:
    assert r["finite equal torch's cast"]
    assert r["nan out"] == r["nan in"], "a NaN rounded to a number"
    assert r["nan sign kept"] and r["nan exact in bf16"]
    assert r["scaled bf16 NaN"] == {"0x7fffffff": r["scaled n"], "0xffffffff": r["scaled n"]}


def test_round_to_bf16_keeps_every_nan_and_rounds_like_the_hardware_in_the_interpreter(interpreted):
    _assert_rounding(interpreted)


@pytest.mark.gpu
def test_round_to_bf16_keeps_every_nan_and_rounds_like_the_hardware_on_cuda():
    _assert_rounding(run_cases("cuda"))


def test_round_to_bf16_compiles_for_the_h100():
    """The NaN select compiles for sm_90 (Triton's wheel carries ptxas), with the loads and stores in vectors."""
    if triton is None:
        pytest.skip("no Triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    src = ASTSource(fn=_round_kernel, signature=sig, constexprs={"BLOCK": 1024}, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert re.search(r"ld\.global(\.\w+)*\.v4", ptx) and re.search(r"st\.global(\.\w+)*\.v4", ptx)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the tests in this file do)")
    print(json.dumps(run_cases("cpu")))
