"""Shared fixtures: one tiny checkpoint per test session, and one vLLM engine when a test needs it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from subprocess_env import repo_env

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# vLLM in tests: run the engine core in-process (no spawned engine process) with a small KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (`make test` runs one worker per core) each worker keeps to one intra-op thread:
# two workers with a thread per core each would oversubscribe the machine. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded default checkpoint (tiny preset, seed 0), written once per session."""
    from posttrain.model_init import init_model

    return init_model("tiny", tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For training-heavy modules (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a
    shared 2-core machine one intra-op thread is several times faster than two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Appended to the measured code: VmHWM is the peak RSS of this process image; ru_maxrss would also
# count the forked pytest process before exec (Linux keeps the high-water mark across execve).
_PRINT_PEAK_RSS = """
import re as _re
print(int(_re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
"""


@pytest.fixture
def peak_rss():
    """`peak_rss(code, *argv, env=...)`: the peak resident memory, in bytes, of a fresh interpreter
    that runs `code` (with `sys.argv[1:] == argv`, the repository importable and `env` added)."""
    import subprocess

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc for VmHWM")

    def measure(code: str, *argv: str, env: dict[str, str] | None = None) -> int:
        full_env = repo_env(**(env or {}))
        r = subprocess.run([sys.executable, "-c", code + _PRINT_PEAK_RSS, *argv], capture_output=True, text=True,
                           env=full_env, cwd=ROOT)
        if r.returncode != 0:
            pytest.fail(f"measured interpreter ({' '.join(argv)}) exited {r.returncode}:\n{r.stderr[-4000:]}", pytrace=False)
        return int(r.stdout.strip().splitlines()[-1])

    return measure


@pytest.fixture
def vllm_llm(tiny_model_dir):
    """A vLLM (CPU build) engine on the tiny checkpoint for one test.

    In-process engines share vLLM's global parallel state, and closing one tears it down for any
    other still alive: so no engine outlives the test (or test module) that made it."""
    from engines.vllm_engine import VLLMColocateEngine

    engine = VLLMColocateEngine(str(tiny_model_dir), max_model_len=256)
    yield engine.llm
    engine.close()


@pytest.fixture(scope="session")
def device():
    """The device a test runs its model and tensors on: CUDA when the machine has it, else the CPU.
    Tests that create tensors next to a model take `model.device` (or this) instead of assuming CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Seconds each module takes (setup + calls + teardown) on a 2-core machine, from `make test
# PYTEST_ARGS=--durations=0` (session 24, Intel Xeon with AMX, nothing else running: 970 s in all); modules not
# listed take under 4 s. `make test` runs the suite on one pytest-xdist worker per core with `--dist loadfile`,
# which hands out whole modules in collection order, each to the worker whose queue is nearly empty. Longest first
# (LPT): test_demo (the whole demo recipe, the suite's critical path) starts at once, and the last modules handed
# out are the short ones, so neither worker is left with a long module while the other idles. (Session 19's replay
# of xdist's scheduling: 846 s with this order, 870 s with the seven longest first and the rest alphabetical.)
MODULE_SECONDS = {
    "test_demo.py": 639, "test_fsdp.py": 139, "test_resume.py": 126, "test_reward_model.py": 106,
    "test_chain.py": 89, "test_scaleout.py": 88, "test_fp8_training.py": 74, "test_sft.py": 69,
    "test_fp8_triton_gemm.py": 48, "test_mla_attention.py": 40, "test_spec_rollouts.py": 28, "test_serve.py": 27,
    "test_fp8_convert.py": 26, "test_rewards.py": 26, "test_distill_kill.py": 23, "test_fp8_triton_quant.py": 22,
    "test_fp8_vllm.py": 22, "test_compat.py": 21, "test_balancing.py": 21, "test_fp8_gemm_contract.py": 20,
    "test_rollout_engines.py": 18, "test_count_experts_traffic.py": 17, "test_fp8_quant.py": 17, "test_grpo.py": 16,
    "test_routed_experts.py": 15, "test_chunked_loss.py": 15, "test_distill.py": 13, "test_count_mla_traffic.py": 13,
    "test_cli.py": 12, "test_count_fp8_kernels.py": 12, "test_sandbox.py": 11, "test_fp8_experts_grouped.py": 11,
    "test_swiglu.py": 10, "test_distill_models.py": 9, "test_model_init.py": 9, "test_bench_fp8_host.py": 6,
    "test_tis.py": 8, "test_dynamic_sampling.py": 6, "test_lora_export.py": 6, "test_bench_gpu_smoke.py": 5,
    "test_bench_gpu_sft.py": 4, "test_model_loading.py": 6,
}
UNLISTED_MODULE_SECONDS = 2


def _longest_first(items: list) -> None:
    # stable: modules of equal weight keep their collection order
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, UNLISTED_MODULE_SECONDS))


def pytest_collection_modifyitems(config, items):
    """Orders the longest modules first (see MODULE_SECONDS). `-m gpu` tests exercise the CUDA
    fast paths (Triton / flex kernels); without CUDA they skip."""
    _longest_first(items)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="gpu test: needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
