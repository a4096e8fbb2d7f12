"""The closed-loop MTP loss weight (`mtp_loss_weight: auto`) on synthetic acceptance series: the
target is the start's acceptance; λ rises while acceptance is below it, decays toward the floor
while at or above it, and stays within its bounds. (The trainer wiring — λ logged per step, its
state resumed — is exercised in tests/test_dynamic_sampling.py's GRPO run.)"""

from __future__ import annotations

import pytest

from posttrain.grpo.mtp_control import MTPWeightController


def _run(series, **kw):
    c = MTPWeightController(**kw)
    return c, [c.update(a) for a in series]


def test_warmup_sets_the_target_and_holds_the_initial_weight():
    c, weights = _run([0.40, 0.42, 0.38], warmup_steps=3)
    assert weights == [0.3, 0.3, 0.3]
    assert c.target == pytest.approx(0.40)
    c.update(None)  # a step without a measurement changes nothing
    c.update(float("nan"))
    assert c.weight == 0.3 and c.steps == 3


def test_weight_rises_when_acceptance_falls_and_decays_to_the_floor_when_it_holds():
    start = [0.40] * 5
    falling = [0.38, 0.36, 0.34, 0.32]  # the policy drifts away from the MTP module
    c, weights = _run(start + falling)
    assert weights[5:] == pytest.approx([0.45, 0.675, 1.0, 1.0])  # ×1.5 a step while below, up to the ceiling
    # acceptance recovers above the target: λ decays, every step, down to the floor and no further
    for _ in range(60):
        w = c.update(0.45)
    assert w == pytest.approx(0.05)  # the default floor (GRPOConfig.mtp_loss_weight_min)
    assert c.update(0.45) == pytest.approx(0.05)
    # a drop after a long hold: λ is back at the start's 0.3 within 5 steps (0.05 · 1.5^5 = 0.38)
    recovering = [c.update(0.30) for _ in range(5)]
    assert recovering[-2] < 0.3 <= recovering[-1]


def test_weight_is_bounded_whatever_the_series():
    c, weights = _run([0.9] * 5 + [0.0] * 50, floor=0.05, ceiling=0.8)
    assert max(weights) == pytest.approx(0.8) and min(weights) >= 0.05
    c, weights = _run([0.1] * 5 + [1.0] * 100, floor=0.05, ceiling=0.8)
    assert min(weights) == pytest.approx(0.05) and max(weights) <= 0.8
    # alternating noise around the target: λ stays within the bounds and does not run away
    c, weights = _run([0.5] * 5 + [0.49, 0.51] * 50)
    assert all(0.05 <= w <= 1.0 for w in weights)


def test_measurements_are_smoothed_and_the_target_stays_fixed():
    c, weights = _run([0.5] * 5 + [0.5, 0.49, 0.5], smoothing=0.9)
    # EMA 0.5 (at target: decay), 0.499 (below: rise), 0.4991 (still below: rise)
    assert weights[5:] == pytest.approx([0.27, 0.405, 0.6075])
    assert c.smoothed == pytest.approx(0.4991) and c.target == pytest.approx(0.5)


def test_state_round_trips():
    c, _ = _run([0.4] * 5 + [0.3, 0.35])
    d = MTPWeightController()
    d.load_state_dict(c.state_dict())
    assert d.update(0.2) == c.update(0.2) and d.state_dict() == c.state_dict()


def test_config_accepts_auto_and_numbers(tmp_path):
    from posttrain.errors import ConfigError
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.recipe import build_config

    assert build_config(GRPORecipeConfig, {"output_dir": str(tmp_path), "mtp_loss_weight": "auto"}).mtp_loss_weight == "auto"
    assert build_config(GRPORecipeConfig, {"output_dir": str(tmp_path), "mtp_loss_weight": "0.1"}).mtp_loss_weight == 0.1
    with pytest.raises(ConfigError, match="mtp_loss_weight"):
        build_config(GRPORecipeConfig, {"output_dir": str(tmp_path), "mtp_loss_weight": "often"})


# -- the MTP module's own learning rate (`mtp_learning_rate`) ----------------------------------------
def _adamw_as_the_trainer_builds_it(model, lr):
    import torch

    named = list(model.named_parameters())
    return torch.optim.AdamW([{"params": [p for n, p in named if "norm" not in n], "weight_decay": 0.1},
                              {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}], lr=lr)


def test_mtp_weights_get_groups_of_their_own_at_their_learning_rate(tiny_model_dir):
    import torch

    from posttrain.grpo.mtp_control import split_mtp_param_groups
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optimizer = _adamw_as_the_trainer_builds_it(model, lr=1e-4)
    mtp = {id(p) for layer in model.mtp_layers for p in layer.parameters()}
    assert split_mtp_param_groups(optimizer, model, 1e-3) == len(mtp) > 0
    assert split_mtp_param_groups(optimizer, model, 1e-3) == 0  # idempotent
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= mtp if group.get("mtp") else not ids & mtp
        assert group["lr"] == (1e-3 if group.get("mtp") else 1e-4)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups if g.get("mtp")) == [0.0, 0.1]
    # the embedding and lm_head the MTP module shares with the main model keep the policy's lr
    shared = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    assert all(group["lr"] == 1e-4 for group in optimizer.param_groups if shared & {id(p) for p in group["params"]})
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("mtp_learning_rate", [None, 1e-2])
def test_the_grpo_trainer_steps_mtp_weights_at_mtp_learning_rate(tmp_path, tiny_model_dir, mtp_learning_rate):
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import build_trainer

    cfg = GRPORecipeConfig(output_dir=str(tmp_path / "grpo"), model_name_or_path=str(tiny_model_dir), use_vllm=False,
                           per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_prompts=16,
                           beta=0.0, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0,
                           mtp_learning_rate=mtp_learning_rate, save_strategy="no", report_to="none")
    trainer = build_trainer(cfg)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    mtp = {id(p) for layer in trainer.model.mtp_layers for p in layer.parameters()}
    for group, lr in zip(trainer.optimizer.param_groups, trainer.lr_scheduler.get_last_lr()):
        moved = {id(p) for p in group["params"]} <= mtp
        assert lr == pytest.approx(1e-2 if moved and mtp_learning_rate else 1e-3)
    assert any(g.get("mtp") for g in trainer.optimizer.param_groups) == bool(mtp_learning_rate)
    for _ in range(5):  # the same schedule: halfway through the cosine, each group is at half its peak
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    peaks = [1e-2 if g.get("mtp") else 1e-3 for g in trainer.optimizer.param_groups]
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([p / 2 for p in peaks])


def test_config_rejects_a_learning_rate_that_is_not_positive(tmp_path):
    from posttrain.errors import ConfigError
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.recipe import build_config

    assert build_config(GRPORecipeConfig, {"output_dir": str(tmp_path), "mtp_learning_rate": "1e-3"}).mtp_learning_rate == 1e-3
    with pytest.raises(ConfigError, match="mtp_learning_rate"):
        build_config(GRPORecipeConfig, {"output_dir": str(tmp_path), "mtp_learning_rate": 0})


def test_the_grpo_trainer_feeds_the_controller_the_acceptance_of_all_ranks(tmp_path, tiny_model_dir, monkeypatch):
    """Each rank's controller saw only its own rank's acceptance, so λ drifted apart between ranks (seen with 2
    processes: 1.0 on one, 0.40 on the other after 10 steps). Here a second rank is stood in for by the sum
    `accelerator.reduce` returns: its 9 hits of 10 join this rank's 1 of 10."""
    from accelerate import Accelerator

    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import build_trainer

    cfg = GRPORecipeConfig(output_dir=str(tmp_path / "grpo"), model_name_or_path=str(tiny_model_dir), use_vllm=False,
                           per_device_train_batch_size=4, num_generations=4, max_completion_length=4, max_prompts=8,
                           beta=0.0, mtp_loss_weight="auto", save_strategy="no", report_to="none")
    trainer = build_trainer(cfg)
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "reduce", lambda t, reduction: t + t.new_tensor([9, 10, 0, 0]))
    trainer._accept_counts = [1, 10]
    trainer._update_mtp_weight()
    assert trainer.mtp_controller.warmup == [pytest.approx(0.5)]
