"""GRPO rollouts (`V3GRPOTrainer._rollout`) with transformers `generate` on the tiny model: how a rank's
slice of TRL's batch is sampled."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model_dir):
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import build_trainer

    tmp = tmp_path_factory.mktemp("grpo_rollout")
    cfg = GRPORecipeConfig(output_dir=str(tmp / "grpo"), model_name_or_path=str(tiny_model_dir), use_vllm=False,
                           per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_prompts=8,
                           beta=0.0, save_strategy="no", seed=0, report_to="none", disable_tqdm=True,
                           reward_funcs=[str(Path(__file__).with_name("rewards_for_tests.py")) + ":length_reward"])
    t = build_trainer(cfg)
    t.model.train()
    return t


def test_a_group_split_over_two_ranks_gets_distinct_samples(trainer, monkeypatch):
    """TRL's sampler splits the global batch into equal rank slices; with 2 rows a rank and G=4 one group
    straddles ranks 0 and 1. Each rank samples its half of the group: with one seed for both (the step's,
    per prompt) they drew the same two samples, so the group held duplicates."""
    from accelerate import Accelerator

    prompt = trainer.train_dataset[0]["prompt"]
    halves = []
    for rank in (0, 1):
        monkeypatch.setattr(Accelerator, "process_index", property(lambda self, r=rank: r))
        halves += trainer._rollout([prompt, prompt], trainer)["completion_ids"]
    assert len(halves) == 4
    assert len({tuple(c) for c in halves}) == 4, halves


def test_prompts_are_rendered_with_chat_template_kwargs(trainer, monkeypatch):
    """`chat_template_kwargs` (DeepSeek-V3.1's template switches thinking mode with `thinking`) reach the
    rollout's prompt as they reach TRL's own rendering; they were dropped, so the policy was sampled on
    another prompt than the one asked for."""
    tok = trainer.processing_class
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                              "{% if thinking %}<think>{% endif %}")
    monkeypatch.setattr(trainer, "chat_template_kwargs", {"thinking": True})
    prompt = [{"role": "user", "content": "1 + 1?"}]
    ids = trainer._tokenize_prompt(prompt)
    assert tok.decode(ids).endswith("<think>")
