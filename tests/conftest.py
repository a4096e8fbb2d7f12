"""Shared fixtures: one tiny checkpoint per test session, and one vLLM engine when a test needs it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# vLLM in tests: run the engine core in-process (no spawned engine process) with a small KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture
def vllm_llm(tiny_model_dir):
    """A vLLM (CPU build) engine on the tiny checkpoint for one test.

    In-process engines share vLLM's global parallel state, and closing one tears it down for any
    other still alive: so no engine outlives the test (or test module) that made it."""
    from posttrain.rollout.engines import VLLMColocateEngine

    engine = VLLMColocateEngine(str(tiny_model_dir), max_model_len=256)
    yield engine.llm
    engine.close()
