"""MTP-speculative rollouts (`rollout_speculative_tokens`): the colocated engine drafts with the policy's
own MTP module, a weight sync updates that drafter, speculation leaves the sampled distribution and its
log-probs unchanged, and a real GRPO step logs the engine's acceptance as `rollout/spec_accept_rate`.

Two engine starts: one on the base checkpoint (the drafter sync), one fresh on the synced weights saved to
disk (the reference for the sync, then the distribution test and the GRPO step, in that order: the step
moves the engine's weights).

The base checkpoint is the tiny model with its lm_head scaled by `SHARPEN`: greedy outputs and the MTP
module's top-1 guesses do not change, but next-token distributions at temperature 1 become peaked (top-1
about 0.5 instead of ~1/1000), so drafts get accepted at temperature 1 too and both branches of the
rejection sampler (accept the draft / resample without it) are exercised.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from engines.types import SamplingSettings

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SHARPEN = 25.0
VARIED_REWARD = str(Path(__file__).with_name("rewards_for_tests.py")) + ":length_reward"
GREEDY = SamplingSettings(temperature=0.0, max_tokens=48, ignore_eos=True)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 1000, (8,), generator=g).tolist() for _ in range(16)]


def _generate_counting(engine, prompts, n, sampling):
    """(outputs, draft tokens, accepted draft tokens) of one generate call."""
    before = engine.spec_decode_counts()
    outs = engine.generate(prompts, n, sampling)
    after = engine.spec_decode_counts()
    return outs, after[0] - before[0], after[1] - before[1]


def _train_mtp_only(model, seqs: torch.Tensor, steps: int = 30) -> None:
    """Adam on the MTP module alone, teacher-forced on `seqs`: a step that changes only the MTP weights."""
    n_main = model.config.num_hidden_layers
    params = [p for name, p in model.named_parameters() if name.startswith(f"model.layers.{n_main}.")]
    opt = torch.optim.Adam(params, lr=3e-3)
    with torch.no_grad():
        hidden = model.model(input_ids=seqs, use_cache=False).last_hidden_state
    for _ in range(steps):
        _, loss = model._mtp(hidden, seqs, None, seqs, None, detach_input=True)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_model_dir) -> Path:
    from transformers import AutoTokenizer

    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN)
    out = tmp_path_factory.mktemp("spec") / "base"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def drafter_sync(tmp_path_factory, base_dir):
    """An engine speculating with the base checkpoint's (random) MTP module measures its greedy acceptance;
    the MTP module alone is then trained on the engine's own greedy outputs and synced into the running
    engine, which measures again. The trained model is saved for a fresh engine."""
    from transformers import AutoTokenizer

    from engines.vllm_engine import VLLMColocateEngine
    from posttrain.layout import weights_for_engine
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    prompts = _prompts()
    engine = VLLMColocateEngine(str(base_dir), max_model_len=256, speculative_tokens=1)
    try:
        outs, drafted0, accepted0 = _generate_counting(engine, prompts, 1, GREEDY)
        tokens0 = [g[0].token_ids for g in outs]
        model = DeepseekV3ForCausalLMWithMTP.from_pretrained(base_dir, dtype=torch.float32)
        _train_mtp_only(model, torch.tensor([p + t for p, t in zip(prompts, tokens0)]))
        engine.sync_weights(weights_for_engine(model, engine))
        outs, drafted1, accepted1 = _generate_counting(engine, prompts, 1, GREEDY)
        tokens1 = [g[0].token_ids for g in outs]
    finally:
        engine.close()
    trained_dir = base_dir.parent / "mtp_trained"
    model.save_pretrained(trained_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(trained_dir)
    return dict(prompts=prompts, model=model.eval(), dir=trained_dir, tokens0=tokens0, tokens1=tokens1,
                before=(drafted0, accepted0), synced=(drafted1, accepted1))


@pytest.fixture(scope="module")
def engine(drafter_sync):
    from engines.vllm_engine import VLLMColocateEngine

    eng = VLLMColocateEngine(str(drafter_sync["dir"]), max_model_len=256, speculative_tokens=1)
    yield eng
    eng.close()


def test_a_weight_sync_updates_the_drafter(drafter_sync, engine):
    """After a step that changed only the MTP weights, the synced engine's drafts are those of a fresh engine
    started from the saved checkpoint: the same greedy tokens, and the same drafts accepted, count for count
    (a stale drafter would stay at the random module's ~0% acceptance)."""
    s = drafter_sync
    drafted0, accepted0 = s["before"]
    drafted1, accepted1 = s["synced"]
    assert accepted0 / drafted0 < 0.05  # the random MTP module
    assert s["tokens1"] == s["tokens0"]  # the target did not change: speculation never changes greedy tokens
    assert accepted1 / drafted1 > 0.5, (drafted1, accepted1)  # the trained MTP module drafts
    outs, drafted2, accepted2 = _generate_counting(engine, s["prompts"], 1, GREEDY)
    assert [g[0].token_ids for g in outs] == s["tokens1"]
    assert (drafted2, accepted2) == (drafted1, accepted1)


def _chi2_upper(df: int, z: float = 3.719) -> float:
    """The chi-square quantile with upper tail Φ(-z) (z = 3.719: 1e-4), Wilson–Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: Counter, probs: torch.Tensor, n: int, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic of `counts` (n draws) against `probs`: one bin per token expected at least
    `min_expected` times, the rest pooled. (statistic, degrees of freedom)"""
    expected = probs.double() * n
    big = [t for t in range(probs.numel()) if expected[t] >= min_expected]
    stat = sum((counts.get(t, 0) - expected[t].item()) ** 2 / expected[t].item() for t in big)
    rest_exp = n - sum(expected[t].item() for t in big)
    rest_obs = n - sum(counts.get(t, 0) for t in big)
    bins = len(big)
    if rest_exp >= min_expected:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        bins += 1
    return stat, bins - 1


def test_speculative_sampling_keeps_the_policys_distribution(drafter_sync, engine):
    """At temperature 1 with drafts accepted often: (1) the log-probs the engine returns for its samples (what
    TIS and rollout/logprob_diff use) are the policy's, computed by transformers on the same sequences; (2) the
    second token -- the first one a draft can decide -- follows the policy's conditional distribution given the
    first (Pearson chi-square over 3,000 samples, 1e-4 level). Without the rejection-sampler fix
    (compat.apply_vllm_cpu_spec_expand) both fail: vLLM's CPU build then scales the target logits by
    uninitialised memory."""
    model, prompts = drafter_sync["model"], drafter_sync["prompts"]
    sampling = SamplingSettings(temperature=1.0, max_tokens=16, seed=5, ignore_eos=True)
    outs, drafted, accepted = _generate_counting(engine, prompts[:8], 4, sampling)
    assert accepted / drafted > 0.1, (drafted, accepted)
    worst = 0.0
    with torch.no_grad():
        for prompt, group in zip(prompts, outs):
            for c in group:
                logits = model(input_ids=torch.tensor([prompt + c.token_ids]), use_cache=False).logits[0].float()
                ref = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
                worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert worst <= 1e-3, worst

    n = 3000
    prompt = prompts[0]
    outs, drafted, accepted = _generate_counting(
        engine, [prompt], n, SamplingSettings(temperature=1.0, max_tokens=2, seed=11, ignore_eos=True))
    assert drafted == n and accepted / drafted > 0.2, (drafted, accepted)
    samples = [c.token_ids for c in outs[0]]
    firsts = Counter(s[0] for s in samples)
    with torch.no_grad():
        p1 = model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1].float().softmax(-1)
    stat, df = _chi2(firsts, p1, n)
    assert stat < _chi2_upper(df), ("first token", stat, df)
    for x1, n1 in firsts.most_common(3):
        with torch.no_grad():
            p2 = model(input_ids=torch.tensor([prompt + [x1]]), use_cache=False).logits[0, -1].float().softmax(-1)
        seconds = Counter(s[1] for s in samples if s[0] == x1)
        stat, df = _chi2(seconds, p2, n1)
        assert stat < _chi2_upper(df), ("second token after", x1, n1, stat, df)


def test_a_grpo_step_logs_the_engines_acceptance(tmp_path, drafter_sync, engine):
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import build_trainer

    cfg = GRPORecipeConfig(
        output_dir=str(tmp_path / "grpo"), model_name_or_path=str(drafter_sync["dir"]), max_steps=1,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=12, learning_rate=1e-3,
        max_prompts=32, save_strategy="no", beta=0.01, seed=0, rollout_speculative_tokens=1,
        reward_funcs=["math_accuracy", VARIED_REWARD],
    )
    trainer = build_trainer(cfg, engine=engine)
    before = engine.spec_decode_counts()
    trainer.train()
    drafted, accepted = (a - b for a, b in zip(engine.spec_decode_counts(), before))
    logged = [h for h in trainer.state.log_history if "rollout/spec_accept_rate" in h]
    assert logged, trainer.state.log_history
    assert drafted > 0  # the step's rollouts were speculative
    # the step's only engine call: the logged rate is vLLM's own count (the MTP module trained on other
    # prompts may well guess none of these right at temperature 1)
    assert logged[-1]["rollout/spec_accept_rate"] == pytest.approx(accepted / drafted)
    assert "mtp/accept_rate" in logged[-1]
    assert logged[-1]["rollout/logprob_diff_max"] <= 1e-3  # the speculating engine's log-probs are the policy's


def test_speculation_is_refused_where_it_cannot_run(tmp_path, tiny_model_dir):
    """One line each, before anything heavy: no vLLM, a vLLM server (its drafter would not be synced), a
    checkpoint without an MTP module, an FP8-served engine (vLLM's layerwise reload skips the drafter)."""
    from types import SimpleNamespace

    from engines.vllm_engine import _spec_tokens_problem
    from posttrain.errors import UserError
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import check_speculative_rollouts

    def cfg(**kw):
        return GRPORecipeConfig(**{"output_dir": str(tmp_path), "model_name_or_path": str(tiny_model_dir),
                                   "rollout_speculative_tokens": 2, **kw})

    with pytest.raises(UserError, match="use_vllm: true"):
        check_speculative_rollouts(cfg(use_vllm=False))
    with pytest.raises(UserError, match="vllm_mode: colocate"):
        check_speculative_rollouts(cfg(vllm_mode="server"))
    with pytest.raises(UserError, match="no MTP module"):
        check_speculative_rollouts(cfg(), SimpleNamespace(num_nextn_predict_layers=0))
    check_speculative_rollouts(cfg(), SimpleNamespace(num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match="rollout_speculative_tokens must be >= 0"):
        cfg(rollout_speculative_tokens=-1)
    assert _spec_tokens_problem(str(tiny_model_dir), fp8_served=False) is None
    assert "layerwise reload" in _spec_tokens_problem(str(tiny_model_dir), fp8_served=True)
    no_mtp = tmp_path / "no_mtp"
    no_mtp.mkdir()
    (no_mtp / "config.json").write_text('{"num_nextn_predict_layers": 0}')
    assert "no MTP module" in _spec_tokens_problem(str(no_mtp), fp8_served=False)


def test_the_drafter_gets_the_engine_s_cpu_attention_backend(tmp_path, monkeypatch):
    """On an AMX CPU vLLM gives the MTP drafter its AMX_MLA attention whatever the dtype, and AMX_MLA rejects fp32
    weights at load ("expect weight to be bfloat16, ..."): the drafter is given the engine's CPU_MLA, unless the
    user chose one. Where the engine keeps vLLM's choice (bf16 without weight syncs), so does the drafter."""
    from engines import vllm_engine as V

    monkeypatch.setattr(V, "on_cpu", lambda: True)
    spec = {"method": "mtp", "num_speculative_tokens": 1}
    fp32 = V.vllm_engine_kwargs(str(tmp_path), dtype="float32", speculative_config=dict(spec))
    assert fp32["attention_config"] == {"backend": "CPU_MLA"}
    assert fp32["speculative_config"] == {**spec, "attention_backend": "CPU_MLA"}
    synced = V.vllm_engine_kwargs(str(tmp_path), dtype="bfloat16", weight_sync=True, speculative_config=dict(spec))
    assert synced["speculative_config"]["attention_backend"] == "CPU_MLA"
    chosen = V.vllm_engine_kwargs(str(tmp_path), dtype="float32",
                                  speculative_config={**spec, "attention_backend": "TORCH_SDPA"})
    assert chosen["speculative_config"]["attention_backend"] == "TORCH_SDPA"
    bf16 = V.vllm_engine_kwargs(str(tmp_path), dtype="bfloat16", speculative_config=dict(spec))
    assert "attention_config" not in bf16 and bf16["speculative_config"] == spec
