"""GRPO on the whole V3 model: sync parity, every parameter group trained, MTP, rewards, bad input.

One vLLM (CPU build) engine serves the module: each trainer pushes its own weights into it on its
first step, which is exactly the weight sync under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.errors import ConfigError, UserError
from posttrain.grpo.config import GRPORecipeConfig
from posttrain.grpo.run import build_trainer, load_prompts
from posttrain.layout import weights_for_engine
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

VARIED_REWARD = str(Path(__file__).with_name("rewards_for_tests.py")) + ":length_reward"
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from engines.vllm_engine import VLLMColocateEngine

    eng = VLLMColocateEngine(str(tiny_model_dir), max_model_len=256)
    yield eng
    eng.close()


def _cfg(tmp_path, model_dir, **kw) -> GRPORecipeConfig:
    base = dict(
        output_dir=str(tmp_path / "grpo"),
        model_name_or_path=str(model_dir),
        max_steps=1,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        learning_rate=1e-3,
        max_prompts=32,
        save_strategy="no",
        beta=0.01,
        bias_update_speed=0.05,
        seed=0,
        reward_funcs=["math_accuracy", VARIED_REWARD],
    )
    base.update(kw)
    return GRPORecipeConfig(**base)


def _group(name: str, n_main: int) -> str:
    if name.startswith(f"model.layers.{n_main}."):
        return "mtp"
    if "e_score_correction_bias" in name:
        return "router_bias"
    if name.endswith("mlp.gate.weight"):
        return "router_weight"
    if ".mlp.experts." in name:
        return "routed_experts"
    if "shared_experts" in name:
        return "shared_experts"
    if "self_attn" in name:
        return "attention"
    return "other"


def _logprobs(model, prompt, completion):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion]), use_cache=False).logits[0].float()
    lp = logits.log_softmax(-1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, engine):
    """One GRPO step with γ > 0 and λ_mtp > 0 on the tiny model; the trainer and the weights before."""
    tmp = tmp_path_factory.mktemp("grpo_step")
    trainer = build_trainer(_cfg(tmp, tiny_model_dir, mtp_loss_weight=0.3), engine=engine)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    return trainer, before


def test_sync_parity_after_a_step(trained, engine):
    trainer, before = trained
    model = trainer.accelerator.unwrap_model(trainer.model)
    after = model.state_dict()
    assert not torch.equal(before["model.layers.1.mlp.gate.e_score_correction_bias"],
                           after["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert not torch.equal(before["model.layers.1.mlp.experts.gate_up_proj"], after["model.layers.1.mlp.experts.gate_up_proj"])
    engine.sync_weights(weights_for_engine(model, engine))
    prompt = trainer.processing_class.apply_chat_template(
        [{"role": "user", "content": "Mia has 12 apples. She buys 7 more. How many apples does she have?"}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    completion = trainer.processing_class("<think>\n12 + 7 = 19\n</think>\nThe answer is \\boxed{19}.",
                                          add_special_tokens=False)["input_ids"]
    model.eval()
    diff = max(abs(a - b) for a, b in zip(engine.score(prompt, completion), _logprobs(model, prompt, completion)))
    model.train()
    assert diff <= 1e-3, diff


def test_every_parameter_group_changes(trained):
    trainer, before = trained
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    n_main = trainer.model.config.num_hidden_layers
    changed: dict[str, list[bool]] = {}
    for k, v in after.items():
        changed.setdefault(_group(k, n_main), []).append(not torch.equal(before[k], v))
    for group in ("attention", "routed_experts", "shared_experts", "router_weight", "router_bias", "mtp"):
        assert any(changed[group]), group
    assert all(changed["router_bias"])  # γ > 0 moves every MoE layer's bias, the MTP block's included
    mtp_names = [k for k in after if _group(k, n_main) == "mtp"]
    assert all(not torch.equal(before[k], after[k]) for k in mtp_names if "e_score" in k or "eh_proj" in k)


def test_logs_what_the_issue_lists(trained):
    trainer, _ = trained
    logged = {k for h in trainer.state.log_history for k in h}
    for key in ("reward", "reward_std", "rewards/math_accuracy/mean", "frac_reward_zero_std", "kl",
                "clip_ratio/region_mean", "completions/mean_length", "rollout/logprob_diff_mean",
                "rollout/logprob_diff_max", "moe/maxvio", "mtp/accept_rate", "mtp_loss", "tokens_per_second",
                "timing/generation", "timing/scoring", "timing/training", "timing/sync_weights"):
        assert key in logged, key
    diffs = [h["rollout/logprob_diff_max"] for h in trainer.state.log_history if "rollout/logprob_diff_max" in h]
    assert max(diffs) <= 1e-3  # the engine samples from the trainer's weights


def test_mtp_accept_rate_counts_the_drafts_a_speculative_decoder_makes(trained):
    """The first completion token is sampled from the prompt, never drafted: GRPO's mtp/accept_rate counted
    it (7 targets for a 7-token answer), the eval stage's drafter_hits does not (6)."""
    from eval_hooks.mtp_acceptance import drafter_hits
    from posttrain.modeling import IGNORE_INDEX

    trainer, _ = trained
    model = trainer.accelerator.unwrap_model(trainer.model)
    prompt, completion = [5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]
    ids = torch.tensor([prompt + completion])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, len(prompt):] = ids[0, len(prompt):]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    terms = trainer._mtp_terms(model, hidden, ids, labels, None)
    [(hits, total)] = drafter_hits(model, [prompt], [[completion]])
    assert (terms["accept_hits"], terms["accept_total"]) == (hits, total) and total == len(completion) - 1
    assert terms["mtp_targets"] == len(completion)  # the loss still learns the first token's guess


def test_mtp_weight_zero_leaves_mtp_untouched_and_gamma_zero_freezes_bias(tmp_path, tiny_model_dir, engine):
    trainer = build_trainer(_cfg(tmp_path, tiny_model_dir, mtp_loss_weight=0.0, bias_update_speed=0.0), engine=engine)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    n_main = trainer.model.config.num_hidden_layers
    for k, v in after.items():
        if k.startswith(f"model.layers.{n_main}.") or "e_score_correction_bias" in k:
            assert torch.equal(before[k], v), k
    assert not torch.equal(before["model.layers.0.self_attn.q_b_proj.weight"], after["model.layers.0.self_attn.q_b_proj.weight"])
    assert any("mtp/accept_rate" in h for h in trainer.state.log_history)


def test_v3_reward_model_runs_as_a_grpo_reward(tmp_path, tiny_model_dir, engine):
    """`reward_model:PATH` (a V3 backbone with a scalar head, as `dsv3-posttrain rm` saves it) scores
    GRPO's completions next to a rule-based reward, with its own per-reward metrics."""
    from posttrain.rm.model import load_reward_backbone, load_tokenizer

    rm_dir = tmp_path / "rm"
    tok = load_tokenizer(str(tiny_model_dir))
    load_reward_backbone(str(tiny_model_dir), tok).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    cfg = _cfg(tmp_path, tiny_model_dir, reward_funcs=["math_accuracy", f"reward_model:{rm_dir}"], reward_weights=[1.0, 0.5])
    trainer = build_trainer(cfg, engine=engine)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/reward_model/mean" in h]
    assert logs and logs[-1]["rewards/reward_model/failures"] == 0.0
    assert logs[-1]["rewards/reward_model/std"] > 0  # a real score per completion, not a constant


def test_checkpoint_loads_in_transformers_with_mtp(tmp_path, trained):
    trainer, _ = trained
    trainer.save_model(str(tmp_path / "ckpt"))
    reloaded = DeepseekV3ForCausalLMWithMTP.from_pretrained(tmp_path / "ckpt")
    live = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, live[k]), k
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]


def _raising_reward(prompts, completions, **kw):
    raise RuntimeError("boom")


def _hanging_reward(prompts, completions, **kw):
    import time

    time.sleep(30)
    return [0.0] * len(completions)


def test_reward_failure_policy(tmp_path, tiny_model_dir, engine, monkeypatch):
    import rewards

    mod = tmp_path / "my_rewards.py"
    mod.write_text(
        "def boom(prompts, completions, **kw):\n    raise RuntimeError('boom')\n\n"
        "def hang(prompts, completions, **kw):\n    import time; time.sleep(30); return [0.0] * len(completions)\n"
    )
    cfg = _cfg(tmp_path, tiny_model_dir, reward_funcs=[f"{mod}:boom"], reward_failure_policy="error")
    trainer = build_trainer(cfg, engine=engine)
    with pytest.raises(rewards.RewardError, match="boom.*raised RuntimeError: boom"):
        trainer.train()
    cfg = _cfg(tmp_path, tiny_model_dir, reward_funcs=["math_accuracy", f"{mod}:hang"],
               reward_failure_policy="skip", reward_timeout_s=1.0)
    trainer = build_trainer(cfg, engine=engine)
    trainer.train()
    failures = [h.get("rewards/hang/failures") for h in trainer.state.log_history if "rewards/hang/failures" in h]
    assert failures and failures[0] == 8.0


def test_bad_input(tmp_path, tiny_model_dir, engine):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Exception, match="empty"):
        load_prompts(_cfg(tmp_path, tiny_model_dir, dataset_name=str(empty)))
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": [{"role": "user", "content": "1 + 1?"}]}) + "\n")
    with pytest.raises(Exception, match="answer"):
        load_prompts(_cfg(tmp_path, tiny_model_dir, dataset_name=str(no_answer)))
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": [{"role": "user", "content": "7 " * 400}], "answer": "7"}) + "\n")
    trainer = build_trainer(_cfg(tmp_path, tiny_model_dir, dataset_name=str(long_prompt), per_device_train_batch_size=4),
                            engine=engine)
    with pytest.raises(ValueError, match="max_model_len"):
        trainer.train()
    with pytest.raises(UserError, match="no checkpoint directory"):
        build_trainer(_cfg(tmp_path, tmp_path / "missing"), engine=engine)


def test_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, engine):
    """Losses, the balancer's history and the closed-loop λ controller (`mtp_loss_weight: auto`) all carry
    over; each checkpoint holds the trainer's own state files. With num_iterations=2 each batch of rollouts
    trains two steps, and TRL checkpoints neither the batch nor its step counter: checkpoints fall between
    generations (save_steps a multiple of 2), and one that does not is refused."""
    common = dict(save_strategy="steps", save_steps=2, lr_scheduler_type="constant", learning_rate=5e-4,
                  mtp_loss_weight="auto", num_iterations=2)
    with pytest.raises(ConfigError, match="save_steps=3: rollouts are generated every 2 optimizer steps"):
        build_trainer(_cfg(tmp_path / "odd", tiny_model_dir, max_steps=4, **{**common, "save_steps": 3}), engine=engine)
    full = build_trainer(_cfg(tmp_path / "a", tiny_model_dir, max_steps=4, **common), engine=engine)
    full.train()
    losses = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h and "step" in h}

    first = build_trainer(_cfg(tmp_path / "b", tiny_model_dir, max_steps=2, **common), engine=engine)
    first.train()  # "killed" after step 2: its checkpoint-2 is what a restart finds
    resumed = build_trainer(_cfg(tmp_path / "b", tiny_model_dir, max_steps=4, **common), engine=engine)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "grpo" / "checkpoint-2"))
    again = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and "step" in h}
    for step in (3, 4):
        assert again[step] == pytest.approx(losses[step], rel=1e-4, abs=1e-6), (step, again, losses)
    assert (tmp_path / "b" / "grpo" / "checkpoint-4" / "model.safetensors").exists()
    assert resumed.checkpoint_state_files() == ["moe_balancer.pt", "mtp_control.json"]
    a, b = tmp_path / "a" / "grpo" / "checkpoint-4", tmp_path / "b" / "grpo" / "checkpoint-4"
    assert json.loads((b / "mtp_control.json").read_text()) == json.loads((a / "mtp_control.json").read_text())
    history = [torch.load(d / "moe_balancer.pt", weights_only=True)["history_steps"] for d in (a, b)]
    assert history == [[1, 2, 3, 4]] * 2  # the resumed run's history goes back to step 1

    between = tmp_path / "b" / "grpo" / "checkpoint-3"  # as a save_steps=1 run of num_iterations=1 would leave
    shutil.copytree(tmp_path / "b" / "grpo" / "checkpoint-2", between)
    state = json.loads((between / "trainer_state.json").read_text())
    (between / "trainer_state.json").write_text(json.dumps({**state, "global_step": 3}))
    with pytest.raises(ConfigError, match="checkpoint-3 is at step 3, between two generations of rollouts"):
        resumed.train(resume_from_checkpoint=str(between))
