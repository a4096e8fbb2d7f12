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
        NaN stays NaN (whatever its bits: a GPU writes 0x7FFFFFFF), and values past bf16's largest round to
        infinity, as the hardware's conversion does."""
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # a NaN's add carries into the exponent and sign: the GPU's canonical NaN 0x7FFFFFFF became -0.0 (and
        # 0xFFFFFFFF +0.0). Keep it NaN -- sign kept, quiet bit set so that no payload truncates to infinity --
        # with bf16's bits; tested on the bits, as no fast-math flag can fold away an integer compare.
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(nan, (bits | 0x400000) & 0xFFFF0000, rounded)
        return bits.to(tl.float32, bitcast=True)
