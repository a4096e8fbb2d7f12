"""PTX of a Triton kernel for an H100, compiled here without a GPU.

Triton's wheel carries its compiler and NVIDIA's ptxas, so kernels compile for sm_90 on any machine: a kernel
the interpreter runs but the compiler rejects, or one that compiles to scalar loads or spills registers, fails
in the CPU suite rather than on a lent GPU.
"""

from __future__ import annotations

H100 = ("cuda", 90, 32)
PTR_TYPES = {"bf16": "*bf16", "fp32": "*fp32", "fp8": "*fp8e4nv", "i64": "*i64"}


def h100_ptx(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int = 4) -> str:
    """PTX of ``kernel`` for an H100, its pointers (``*_ptr`` parameters, typed by ``pointers``, fp32 by default)
    16-byte aligned and its specialized ints divisible by 16, as a launch on V3 shapes specializes them (hidden
    sizes 7168, 2048, ...; a zero batch stride)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        if param.is_constexpr or param.name in constexprs:  # an int equal to 1 is specialized as a constant
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = PTR_TYPES[pointers.get(param.name, "fp32")]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "i32"
            if not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget(*H100), options={"num_warps": num_warps}).asm["ptx"]
