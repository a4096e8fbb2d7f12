"""Runs `cli.main` with accelerate's FSDP2 on CPU (gloo), for the FSDP tests.

Launched by `accelerate launch --config_file recipes/accelerate/fsdp2-*.yaml`, so every FSDP setting
comes from the shipped config through accelerate's own environment variables. accelerate 1.15 only
turns a run into FSDP on accelerator backends: on a CPU its state stays MULTI_CPU and the FSDP
plugin is dropped (a product run stops there with `posttrain.distributed.check_launch`'s one-line
error). This test-only shim makes the MULTI_CPU state FSDP, so that `accelerator.prepare` runs
accelerate's real `fsdp2_prepare_model` — torch's `fully_shard` per wrapped layer, RAM-efficient
loading from rank 0, activation checkpointing — over a gloo group. Nothing else changes.

On a machine with GPUs the tests hide them from the launch (CUDA_VISIBLE_DEVICES=""), so that
accelerate comes up MULTI_CPU there too. A CUDA build of torch still names CUDA as the accelerator
then: `torch._C._get_accelerator()` is the compile-time accelerator, whatever devices are visible,
and `fully_shard` builds its default mesh on it (torch/distributed/fsdp/_fully_shard/_fsdp_init.py,
`_init_default_mesh`), which would put the shards on a device the run cannot see. So the shim also
makes torch.distributed's accelerator detection answer CPU, as a CPU build of torch does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _detect_no_accelerator() -> None:
    """`torch._C._get_accelerator` as a CPU-only build of torch has it (no visible device here)."""
    import torch

    if torch.cuda.is_available():  # a visible GPU: accelerate would not have come up MULTI_CPU
        return

    def get_accelerator(check: bool | None = None) -> torch.device:
        if check:
            raise RuntimeError("Cannot access accelerator device when none is available.")
        return torch.device("cpu")

    torch._C._get_accelerator = get_accelerator


def force_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # both singletons: AcceleratorState re-reads PartialState's on later constructions
            self.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            _detect_no_accelerator()

    AcceleratorState.__init__ = init


def trace_checkpoint_reads(log_path: str) -> None:
    """Test-only (POSTTRAIN_TEST_READ_LOG): appends "RANK BYTES" to `log_path` for every tensor this rank
    reads from a safetensors file in a checkpoint-N directory, so that a test can see which ranks read a
    resumed checkpoint."""
    import safetensors
    import safetensors.torch

    real = safetensors.safe_open

    class Traced:
        def __init__(self, filename, *args, **kwargs):
            self._file, self._traced = real(filename, *args, **kwargs), "checkpoint-" in str(filename)

        def __enter__(self):
            self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def _record(self, tensors):
            if self._traced:
                with open(log_path, "a") as f:
                    f.writelines(f"{os.environ.get('RANK', '0')} {t.numel() * t.element_size()}\n" for t in tensors)

        def get_tensor(self, name):
            tensor = self._file.get_tensor(name)
            self._record([tensor])
            return tensor

        def get_tensors(self):  # safetensors.torch.load_file
            tensors = self._file.get_tensors()
            self._record(tensors.values())
            return tensors

        def __getattr__(self, name):
            return getattr(self._file, name)

    safetensors.safe_open = safetensors.torch.safe_open = Traced


if __name__ == "__main__":
    force_fsdp_on_cpu()
    if os.environ.get("POSTTRAIN_TEST_READ_LOG"):
        trace_checkpoint_reads(os.environ["POSTTRAIN_TEST_READ_LOG"])
    import cli

    cli.entry()  # as `python cli.py` ends, launched ranks included
