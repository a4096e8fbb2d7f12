"""Every place posttrain reaches into another library's internals, in one list.

Each contact point names the library, the version range it was tested with, why it is needed and
the target it patches; `check_contact_points()` verifies that the installed versions fall in
the ranges and that every target still exists (tests/test_compat.py). Patches are applied
explicitly by calling their `apply_*` function, which is idempotent.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContactPoint:
    library: str  # distribution name, as importlib.metadata knows it
    versions: tuple[str, str]  # tested range: [low, high)
    target: str  # "module:attribute"
    reason: str


ACCELERATE_FSDP2_LOAD = ContactPoint(
    library="accelerate",
    versions=("1.15.0", "1.16.0"),
    target="accelerate.utils.fsdp_utils:fsdp2_load_full_state_dict",
    reason="RAM-efficient FSDP2 loading assumes every state-dict entry is a sharded DTensor; "
    "V3's `e_score_correction_bias` buffers are plain tensors ('Tensor' object has no attribute 'device_mesh').",
)

CONTACT_POINTS: list[ContactPoint] = [ACCELERATE_FSDP2_LOAD]


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _resolve(target: str):
    module, attr = target.split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check_contact_points() -> list[str]:
    """Problems with the installed libraries: versions outside a tested range, missing targets."""
    problems = []
    for cp in CONTACT_POINTS:
        try:
            installed = importlib.metadata.version(cp.library)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{cp.library} is not installed ({cp.target})")
            continue
        low, high = cp.versions
        if not (_version_tuple(low) <= _version_tuple(installed) < _version_tuple(high)):
            problems.append(f"{cp.library} {installed} is outside the tested range [{low}, {high}) of {cp.target}")
        try:
            _resolve(cp.target)
        except (ImportError, AttributeError) as e:
            problems.append(f"{cp.target} no longer exists: {e}")
    return problems


# -- accelerate: RAM-efficient FSDP2 loading with buffers ------------------------------------------
def fsdp2_load_full_state_dict(accelerator, model: torch.nn.Module, full_sd: dict, cpu_offload: bool = False):
    """Drop-in for accelerate's `fsdp2_load_full_state_dict` that also handles plain (unsharded)
    entries: buffers such as the routers' `e_score_correction_bias`, which FSDP2 leaves replicated.

    Rank 0 holds the full state (`full_sd`), the other ranks a model on the meta device. Each entry
    is broadcast from rank 0 in the order of the sharded state dict; a DTensor entry is then
    sharded like its parameter, a plain one is kept whole on the accelerator's device. Parameters
    keep the dtype the sharded model gave them (as accelerate does), buffers keep the checkpoint's.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded_sd = model.state_dict()
    device = torch.device(accelerator.device)
    is_main = accelerator.is_main_process
    loaded: dict[str, torch.Tensor] = {}
    for name, sharded in sharded_sd.items():
        if is_main:
            if name not in full_sd:
                raise KeyError(f"{name} is in the sharded model but not in the full state dict")
            full = full_sd[name].detach()
            if isinstance(full, DTensor):
                full = full.to_local()
            meta = torch.tensor([full.dim(), *full.shape, _DTYPES.index(full.dtype)], dtype=torch.long)
        else:
            meta = torch.zeros(2 + sharded.dim(), dtype=torch.long)
        # The buffer's dtype comes from rank 0 (a meta buffer on the other ranks may differ).
        meta = meta.to(device)
        dist.broadcast(meta, src=0)
        dtype = _DTYPES[int(meta[-1])]
        if is_main:
            full = full.to(device=device, dtype=dtype).contiguous()
        else:
            full = torch.empty(tuple(int(s) for s in meta[1:-1]), device=device, dtype=dtype)
        dist.broadcast(full, src=0)
        if isinstance(sharded, DTensor):
            tensor = distribute_tensor(full, sharded.device_mesh, sharded.placements)
            if sharded.dtype.is_floating_point and sharded.dtype != tensor.dtype:
                tensor = tensor.to(sharded.dtype)
            if cpu_offload:
                tensor = tensor.to("cpu")
        else:
            tensor = full
        loaded[name] = tensor
    model.load_state_dict(loaded, assign=True)
    return model


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.int64,
           torch.int32, torch.bool, torch.uint8, torch.int8, torch.float8_e5m2]


def apply_accelerate_fsdp2_loading() -> None:
    """Route accelerate's FSDP2 preparation through `fsdp2_load_full_state_dict` above.

    `fsdp2_prepare_model` looks the loader up in its module's globals at call time, so replacing the
    module attribute is enough."""
    import accelerate.utils.fsdp_utils as fsdp_utils

    fsdp_utils.fsdp2_load_full_state_dict = fsdp2_load_full_state_dict


def apply_training_patches() -> None:
    """The patches every trainer needs; called before `accelerator.prepare`."""
    apply_accelerate_fsdp2_loading()


__all__ = [
    "CONTACT_POINTS",
    "ContactPoint",
    "apply_accelerate_fsdp2_loading",
    "apply_training_patches",
    "check_contact_points",
    "fsdp2_load_full_state_dict",
]
