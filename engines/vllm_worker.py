"""vLLM worker classes that apply this project's fixes in whichever process vLLM builds its worker.

vLLM's server always runs its engine core in a child process, and its CPU platform starts it with
`spawn` (a fresh interpreter): patches applied in the launching process do not reach it. vLLM builds
its worker from the qualified class name in `worker_cls` (compat.VLLM_WORKER_CLS), so
`engine_kwargs` names one of these, and the fixes are applied right before vLLM's own worker starts,
in the same process as the model. Imported by vLLM only, when it resolves that name.
"""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker as _CPUWorker
from vllm.v1.worker.gpu_worker import Worker as _GPUWorker

from . import compat


def _apply_fixes(vllm_config, *, cpu: bool, weight_sync: bool) -> None:
    from .vllm_engine import DEQUANTIZED_FP8_LOAD_FORMAT, _register_dequantizing_loader

    if cpu:
        compat.apply_vllm_cpu_patches(weight_sync=weight_sync)
    if vllm_config.load_config.load_format == DEQUANTIZED_FP8_LOAD_FORMAT:
        _register_dequantizing_loader()


class CPUWorker(_CPUWorker):
    """vLLM's CPU worker after the CPU build's fixes (native rotary embedding) and, for the dequantized
    view of an FP8 checkpoint, the dequantizing loader."""

    weight_sync = False

    def __init__(self, vllm_config, *args, **kwargs):
        _apply_fixes(vllm_config, cpu=True, weight_sync=self.weight_sync)
        super().__init__(vllm_config, *args, **kwargs)


class WeightSyncCPUWorker(CPUWorker):
    """`CPUWorker` for an engine that takes weight syncs: Linear layers also keep their plain weights."""

    weight_sync = True


class GPUWorker(_GPUWorker):
    """vLLM's GPU worker with the dequantizing loader registered (only named for the dequantized view)."""

    def __init__(self, vllm_config, *args, **kwargs):
        _apply_fixes(vllm_config, cpu=False, weight_sync=False)
        super().__init__(vllm_config, *args, **kwargs)
