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


def test_greedy_n_copies_the_length_cap_warning_and_finish_reasons_on_a_real_engine(tiny_model_dir, caplog):
    """On vLLM itself: greedy with n > 1 (which vLLM refuses) gives n copies of the n = 1 greedy answer, for
    token prompts and chat prompts; a prompt whose length plus max_tokens passes max_model_len is cut at
    max_model_len (finish "length") with one warning; and the finish reasons the server engine derives from
    the tokens (`_finish_reason`) are the ones vLLM reports."""
    import logging

    import torch._dynamo.utils
    import vllm.v1.sample.sampler as vllm_sampler
    from transformers import AutoTokenizer
    from vllm.platforms import current_platform

    from engines import SamplingSettings, compat
    from engines.vllm_engine import VLLMColocateEngine, chat_completions

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok("Mia has 12 apples. She buys 7 more.", add_special_tokens=False)["input_ids"]
    engine = VLLMColocateEngine(str(tiny_model_dir), max_model_len=64)
    compiled_before = torch._dynamo.utils.counters["frames"]["total"]
    try:
        greedy = SamplingSettings(temperature=0.0, max_tokens=6, seed=3)  # log-probs asked for (the default)
        (one,) = engine.generate([prompt], 1, greedy)[0]
        if current_platform.is_cpu():
            # their ranks are counted eagerly, not by an inductor kernel compiled in each fresh engine process the
            # first time log-probs are asked for (VLLM_CPU_LOGPROB_RANKS: 3+ s per GRPO start)
            assert vllm_sampler.batched_count_greater_than is compat.count_at_least_cpu
            assert torch._dynamo.utils.counters["frames"]["total"] == compiled_before
        group = engine.generate([prompt], 4, greedy)[0]
        assert [(c.token_ids, c.logprobs, c.finish_reason) for c in group] == [(one.token_ids, one.logprobs,
                                                                                 one.finish_reason)] * 4
        chats = [[{"role": "user", "content": "2+2?"}]]
        (chat_one,) = chat_completions(engine.llm, chats, 1, greedy)[0]
        chat_group = chat_completions(engine.llm, chats, 3, greedy)[0]
        assert [(c.token_ids, c.text) for c in chat_group] == [(chat_one.token_ids, chat_one.text)] * 3

        with caplog.at_level(logging.WARNING, logger="engines.vllm_engine"):
            long = (prompt * 10)[:60]
            (capped,) = engine.generate([long], 1, SamplingSettings(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
            engine.generate([long], 1, SamplingSettings(temperature=0.0, max_tokens=20, ignore_eos=True))
        assert len(capped.token_ids) == 4 and capped.finish_reason == "length"
        warned = [r.getMessage() for r in caplog.records if "max_model_len (64)" in r.getMessage()]
        assert len(warned) == 1 and "60 tokens" in warned[0] and "max_tokens=20" in warned[0], warned

        sampled = SamplingSettings(temperature=1.0, max_tokens=8, seed=5)
        firsts = engine.generate([prompt], 8, sampled)[0]
        # evaluation asks for no log-probs: the same samples, none attached
        bare = engine.generate([prompt], 8, SamplingSettings(temperature=1.0, max_tokens=8, seed=5, logprobs=False))[0]
        assert [c.token_ids for c in bare] == [c.token_ids for c in firsts]
        assert all(c.logprobs is None for c in bare) and all(len(c.logprobs) == len(c.token_ids) for c in firsts)
        stops = sorted({c.token_ids[2] for c in firsts})[:3]  # tokens the samples draw: some completions stop on them
        with_stops = SamplingSettings(temperature=1.0, max_tokens=8, seed=5, stop_token_ids=stops)
        outs = engine.generate([prompt, prompt[:5]], 8, with_stops)
        reasons = [c.finish_reason for g in outs for c in g]
        assert "stop" in reasons and "length" in reasons
        from engines.vllm_engine import _finish_reason

        assert [_finish_reason(c.token_ids, with_stops, [tok.eos_token_id]) for g in outs for c in g] == reasons
    finally:
        engine.close()
