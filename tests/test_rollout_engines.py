"""The colocated vLLM engine (engines/vllm_engine.py) outside the GRPO trainer: what a weight
sync leaves in the engine equals what loading the same weights from disk gives."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_bf16_engine_after_a_sync_equals_a_fresh_engine_on_the_same_weights(tmp_path, tiny_model_dir):
    """In bf16 on a CPU with AMX, vLLM would pick its AMX_MLA backend, which frees `kv_b_proj.weight`
    after loading, so a sync fails ("Attempted to load weight ... into parameter (torch.Size([0]))");
    an engine that takes syncs runs CPU_MLA on CPU. On any CPU this checks the bf16 sync end to end: perturbed weights pushed into a running engine score a completion exactly as a
    new engine loaded from those weights does."""
    from transformers import AutoTokenizer

    from posttrain.layout import weights_for_engine
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP
    from engines.vllm_engine import VLLMColocateEngine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok("Mia has 12 apples. She buys 7 more.", add_special_tokens=False)["input_ids"]
    completion = tok(" The answer is 19.", add_special_tokens=False)["input_ids"]
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * (p.std() if p.numel() > 1 else 1.0))
    perturbed = tmp_path / "perturbed"
    model.save_pretrained(perturbed)
    tok.save_pretrained(perturbed)

    engine = VLLMColocateEngine(str(tiny_model_dir), dtype="bfloat16", max_model_len=256)
    try:
        before = engine.score(prompt, completion)
        engine.sync_weights(weights_for_engine(model, engine))
        synced = engine.score(prompt, completion)
    finally:
        engine.close()
    engine = VLLMColocateEngine(str(perturbed), dtype="bfloat16", max_model_len=256)
    try:
        fresh = engine.score(prompt, completion)
    finally:
        engine.close()
    assert max(abs(a - b) for a, b in zip(before, fresh)) > 0.01  # the sync had something to change
    assert max(abs(a - b) for a, b in zip(synced, fresh)) <= 1e-6
