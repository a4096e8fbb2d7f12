"""Rounding float32 to bf16 inside Triton kernels, the same on a GPU and in Triton's CPU interpreter.

A GPU's ``cvt`` rounds to nearest even; Triton's CPU interpreter truncates its casts. Rounding on the bits
first makes the final cast exact on both, so the interpreter tests check the bits a GPU writes.

It is also the toolkit's one optional import of Triton: the kernel modules take ``triton`` and ``tl`` from
here, None (and ``round_to_bf16`` None) on a CPU install without it, where their eager ops run. With it
comes the one fix the interpreter needs on Triton < 3.7 (``engines.compat.apply_triton_interpreter_index``).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install may lack Triton; nothing here is then defined
    triton = None
    tl = None
    round_to_bf16 = None

if triton is not None:
    from engines.compat import apply_triton_interpreter_index

    apply_triton_interpreter_index()  # a no-op from Triton 3.7 on

    @triton.jit
    def round_to_bf16(y):
        """float32 ``y`` rounded to the nearest bf16 value, ties to even (still float32; casting it is exact).
        NaN stays NaN, and values past bf16's largest round to infinity, as the hardware's conversion does."""
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
