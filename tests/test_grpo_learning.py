"""GRPO learns (issue #6): from an SFT checkpoint of the tiny model, a short GRPO run with the
math_accuracy reward raises the mean reward and held-out greedy accuracy above the SFT checkpoint's.

The SFT checkpoint is made here: the tiny model, 400 steps on the short reference solutions of the
built-in `digits` level (single-digit + and -). GRPO then trains on the task's operands-up-to-4
variant (`max_operand=4`, ~40 arithmetic facts, so each fact recurs every few steps) and is scored
on held-out test-split problems of that variant (other wordings of the same facts). Over the whole
`digits` level (~190 facts) a 1.2M-parameter model's gains from a short run are within the noise
of held-out accuracy (benchmarks/RESULTS.md, "GRPO learning"); on this variant they are not.
G = 8 completions for 16 prompts per step at temperature 1, the whole model trained (MTP and
balancing on), fixed seeds throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

RUN_STEPS = 60
TASK = "builtin:arith?level=digits&max_operand=4"
HELD_OUT = 300  # test-split problems of TASK
MARGIN = 0.04   # required gain in held-out greedy accuracy (measured +0.10, +0.11, +0.19 over GRPO seeds 0-2;
                # +0.097 from the weaker SFT checkpoint the grouped_mm experts kernel gives, 0.530)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory) -> Path:
    from data_pipelines.arith_task import generate_split
    from posttrain.model_init import init_model
    from posttrain.recipe import build_config
    from posttrain.sft.config import SFTRecipeConfig
    from posttrain.sft.run import run_sft

    tmp = tmp_path_factory.mktemp("grpo_learning")
    data = tmp / "sft.jsonl"
    with data.open("w") as f:
        for row in generate_split("train", 2000, seed=0, level="digits"):
            f.write(json.dumps({"messages": row["prompt"] + [{"role": "assistant", "content": row["solution"]}]}) + "\n")
    cfg = build_config(SFTRecipeConfig, dict(
        model_name_or_path=str(init_model("tiny", tmp / "init", seed=0)), dataset_name=str(data),
        output_dir=str(tmp / "sft"), max_steps=400, learning_rate=3e-3, per_device_train_batch_size=8, max_length=128,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 3e-4}, warmup_steps=10,
        save_strategy="no", seed=0, bias_update_speed=0.01, disable_tqdm=True))
    run_sft(cfg)
    return tmp / "sft"


def test_grpo_raises_reward_and_held_out_accuracy_above_the_sft_checkpoint(sft_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from eval_hooks.accuracy import evaluate_accuracy
    from eval_hooks.benchmarks import load_benchmark
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import build_trainer
    from engines.vllm_engine import VLLMColocateEngine
    from posttrain.layout import weights_for_engine

    tok = AutoTokenizer.from_pretrained(sft_checkpoint)
    prompts, answers = load_benchmark(f"{TASK}&n_test={HELD_OUT}", "test", HELD_OUT)
    engine = VLLMColocateEngine(str(sft_checkpoint), max_model_len=256)
    try:
        before = evaluate_accuracy(engine, tok, prompts, answers, max_tokens=48)["accuracy"]
        # the mean reward on fixed held-out prompts (k samples at the training temperature): the
        # per-step training reward varies with each step's prompts more than GRPO moves it
        sampled_before = evaluate_accuracy(engine, tok, prompts, answers, k=4, temperature=1.0, max_tokens=48)["mean_correct"]
        cfg = GRPORecipeConfig(
            output_dir=str(tmp_path / "grpo"), model_name_or_path=str(sft_checkpoint),
            dataset_name=TASK, reward_funcs=["math_accuracy"],
            max_steps=RUN_STEPS, per_device_train_batch_size=128, num_generations=8, max_completion_length=48,
            learning_rate=1e-4, lr_scheduler_type="constant", beta=0.0, save_strategy="no", seed=0,
            disable_tqdm=True, report_to="none",
        )
        trainer = build_trainer(cfg, engine=engine)
        trainer.train()
        engine.sync_weights(weights_for_engine(trainer.model, engine))
        after = evaluate_accuracy(engine, tok, prompts, answers, max_tokens=48)["accuracy"]
        sampled_after = evaluate_accuracy(engine, tok, prompts, answers, k=4, temperature=1.0, max_tokens=48)["mean_correct"]
    finally:
        engine.close()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    accept = [h["mtp/accept_rate"] for h in trainer.state.log_history if "mtp/accept_rate" in h]
    assert len(rewards) == RUN_STEPS
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    print(f"held-out greedy accuracy {before:.3f} -> {after:.3f}; held-out mean reward (k=4) {sampled_before:.3f} -> "
          f"{sampled_after:.3f}; training reward first 10 steps {first:.3f}, last 10 {last:.3f}; "
          f"mtp/accept_rate {sum(accept[:10]) / 10:.3f} -> {sum(accept[-10:]) / 10:.3f}")
    # room for the required gain: the SFT checkpoint's accuracy differs by machine (0.53 and 0.90 measured)
    assert 0.1 < before <= 1 - MARGIN
    assert last > first + 0.03, (first, last)  # measured 0.553 -> 0.648
    assert sampled_after > sampled_before, (sampled_before, sampled_after)
    assert after >= before + MARGIN, (before, after)
    # λ_mtp = 0.3 (the default): the MTP module keeps up with the changing policy; its acceptance
    # (mean of the first vs the last 10 steps) stays at its start, within one point of noise
    # (measured with GRPO seeds 0 / 1 / 2: 0.952 -> 0.961, 0.955 -> 0.958, 0.956 -> 0.956)
    assert cfg.mtp_loss_weight > 0 and len(accept) == RUN_STEPS
    assert sum(accept[-10:]) / 10 >= sum(accept[:10]) / 10 - 0.01, accept
