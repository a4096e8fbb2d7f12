"""Defaults that SFT and GRPO both set on their transformers `TrainingArguments`."""

from __future__ import annotations

from typing import Any


def apply_process_defaults(args: Any, mtp_module_unused: bool) -> None:
    """Called from the recipe configs' `__post_init__`, before transformers' own."""
    import torch

    if not torch.cuda.is_available():
        # Without it transformers sets up no process group on a CPU-only machine, and
        # `accelerate launch --num_processes 2` would run two independent single-process jobs.
        args.use_cpu = True
    if args.ddp_find_unused_parameters is None:
        # When the MTP module is trained every parameter takes part (routed experts are fused
        # tensors) and DDP's unused-parameter search is wasted work; it would also trip over the
        # output head, which the main and MTP heads share. With λ = 0 the MTP module is unused.
        args.ddp_find_unused_parameters = mtp_module_unused
