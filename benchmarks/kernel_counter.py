"""Counting the device kernels (and their memory traffic) a forward+backward launches, on any machine.

A dispatch mode sees every aten op; each one that is not a view, metadata or an allocation is one kernel on
a GPU. Calls that stand for one kernel (a Triton kernel run in the interpreter, a CPU stand-in for torch's
FP8 GEMMs) are wrapped with :meth:`KernelCounter.wrap`: one kernel each, and their own aten ops inside are
not counted. Bytes are each kernel's tensor operands, inputs and outputs, at their size: what a kernel that
reads each input once and writes each output once moves (an in-place op's tensor counts as read and written).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch nothing on a GPU: views, metadata, allocations
NOT_KERNELS = {"view", "_unsafe_view", "t", "transpose", "as_strided", "empty", "empty_strided", "empty_like", "detach", "alias",
               "slice", "expand", "unsqueeze", "squeeze", "permute", "select", "_reshape_alias", "reshape",
               "lift_fresh", "new_empty", "new_empty_strided", "split", "split_with_sizes", "chunk",
               "unbind", "narrow"}
# matrix products: counted as kernels, their bytes kept apart (a GEMM's traffic is not glue)
GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "grouped_mm", "_scaled_mm", "_scaled_grouped_mm", "matmul"}


def report_kernels_by_name(rows: list[dict], json_path: str | None) -> None:
    """Prints each implementation's kernels by name (``rows``: dicts with "impl" and "kernels by name") and writes
    the rows as JSON to ``json_path`` when one is given: the end of every count script's report."""
    for r in rows:
        print(f"\n{r['impl']}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["kernels by name"].items())))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))


def tensor_bytes(*values) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))


class KernelCounter(TorchDispatchMode):
    """``counts`` per kernel name ("aten <op>" or a wrapped call's name) and ``nbytes`` likewise."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.nbytes: collections.Counter = collections.Counter()
        self.inside = 0

    def wrap(self, name: str, fn: Callable, traffic: Callable[..., int] | None = None) -> Callable:
        """``fn`` counted as one kernel named ``name``; ``traffic(out, *args, **kwargs)`` gives its bytes."""
        def call(*args, **kwargs):
            self.inside += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.inside -= 1
            if out is not None:  # a Triton wrapper that declines a shape launches nothing
                self.counts[name] += 1
                if traffic is not None:
                    self.nbytes[name] += traffic(out, *args, **kwargs)
            return out
        return call

    def clear(self) -> None:
        self.counts.clear()
        self.nbytes.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.inside and name not in NOT_KERNELS:
            self.counts["aten " + name] += 1
            self.nbytes["aten " + name] += tensor_bytes(args, kwargs or {}, out)
        return out

    def split(self) -> dict[str, int]:
        """kernels, GEMM kernels, and the bytes of everything that is not a GEMM."""
        gemm = sum(v for k, v in self.counts.items() if k.removeprefix("aten ") in GEMMS)
        glue_bytes = sum(v for k, v in self.nbytes.items() if k.removeprefix("aten ") not in GEMMS)
        return {"kernels": sum(self.counts.values()) - gemm, "gemm kernels": gemm, "glue bytes": glue_bytes}
