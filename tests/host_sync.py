"""Finds, on a CPU, the operations that make a CUDA training step wait for the GPU.

On CUDA, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``), ops whose
output size depends on values (``nonzero``, boolean-mask indexing, ``repeat_interleave`` without
``output_size``, ``bincount``, ``unique``, ``masked_select``) and tensors built from Python data
(``torch.tensor([...])``: a host-to-device copy) block the CPU until the GPU has caught up. On a CPU they cost
nothing, so they slip into hot paths unseen; ``torch.cuda.set_sync_debug_mode`` would catch them, but only
on a GPU. :class:`HostSyncRecorder` sees the same operations through torch's dispatcher (and ``tolist``,
which does not go through it) so that a CPU test can assert a hot path has none.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_VALUE_READS = {aten._local_scalar_dense.default}  # item(), bool(t), int(t), float(t)
_DATA_DEPENDENT_SHAPES = {
    aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
}
_FROM_PYTHON_DATA = {aten.lift_fresh.default}  # torch.tensor(python data): a host-to-device copy on CUDA


def _has_bool_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dtype == torch.bool
    if isinstance(obj, (list, tuple)):
        return any(_has_bool_tensor(o) for o in obj)
    return False


class HostSyncRecorder(TorchDispatchMode):
    """``with HostSyncRecorder() as rec: ...`` then ``rec.syncs``: one line per operation that would wait
    for the GPU (or copy Python data to it) on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self._tolist = None

    def __enter__(self):
        recorder = self
        real = torch.Tensor.tolist

        def tolist(t, *a, **k):
            recorder.syncs.append("Tensor.tolist")
            return real(t, *a, **k)

        self._tolist = real
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_READS:
            self.syncs.append(f"{func} (a value read on the host)")
        elif func in _DATA_DEPENDENT_SHAPES:
            self.syncs.append(f"{func} (output size depends on values)")
        elif func in _FROM_PYTHON_DATA:
            self.syncs.append(f"{func} (a tensor from Python data: host-to-device copy)")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _has_bool_tensor(args[1]):
            self.syncs.append(f"{func} with a boolean mask (nonzero inside)")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.syncs.append(f"{func} without output_size")
        elif func is aten.repeat_interleave.self_Tensor and kwargs.get("output_size") is None:
            self.syncs.append(f"{func} without output_size")
        return func(*args, **kwargs)
