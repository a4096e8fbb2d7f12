"""What the training code needs to know about the process layout: a launch check, and full
tensors out of FSDP2-sharded models (DTensor parameters) for weight sync and export."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .errors import UserError

CPU_DATA_PARALLEL_CONFIG = "recipes/accelerate/cpu-2proc.yaml"


def check_launch(num_processes: int, distributed_type: str) -> None:
    """Stops a run whose launch asked for what accelerate did not set up.

    `accelerate launch` with an FSDP config on a machine without GPUs starts WORLD_SIZE processes,
    but accelerate 1.15 sets up FSDP only on accelerator backends: the processes come up alone
    (distributed_type NO, training independently into one output_dir) or as plain CPU data
    parallelism, not the sharding the config asked for."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    kind = str(distributed_type).rsplit(".", 1)[-1]
    hint = f"for data parallelism on CPU use accelerate launch --config_file {CPU_DATA_PARALLEL_CONFIG}"
    if fsdp and kind != "FSDP":
        needs = "needs GPUs" if not torch.cuda.is_available() else "was not set up"
        raise UserError(f"the accelerate config asks for FSDP, which {needs}: accelerate set up {kind} with "
                        f"{num_processes} process(es) instead; {hint}")
    if world > 1 and num_processes != world:
        raise UserError(f"launched {world} processes but accelerate set up {num_processes} ({kind}): they would "
                        f"train independently into one output_dir; {hint}")


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard is all-gathered (a collective: every rank must call it, in
    the same order); a plain tensor is returned as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: full_tensor(t) for name, t in state.items()}


def model_is_sharded(model: torch.nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def load_full_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True,
                         from_rank0: bool = False) -> None:
    """Loads full (unsharded) tensors into `model`, sharded or not. Every rank passes the full state,
    or, with `from_rank0` on a sharded model, rank 0 does and the others pass {} and receive each
    tensor by broadcast (a collective then). `strict=False` loads a subset, e.g. one layer."""
    if not model_is_sharded(model):
        model.load_state_dict(dict(state), strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=strict, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, dict(state), options=options)


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of an FSDP2 model on rank 0's CPU (an empty dict on the other ranks).
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
