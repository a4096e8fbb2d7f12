"""The launch guard and the full-tensor helpers (posttrain.distributed), in one process."""

from __future__ import annotations

import pytest
import torch

from posttrain.distributed import check_launch, full_tensors, load_full_state_dict, model_is_sharded
from posttrain.errors import UserError


def test_a_single_process_run_passes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_launch(1, "DistributedType.NO")


def test_cpu_data_parallelism_passes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_launch(2, "DistributedType.MULTI_CPU")


@pytest.mark.parametrize("kind", ["DistributedType.NO", "DistributedType.MULTI_CPU"])
def test_an_fsdp_launch_that_accelerate_did_not_set_up_stops(monkeypatch, kind):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"asks for FSDP, which needs GPUs.*recipes/accelerate/cpu-2proc.yaml"):
        check_launch(1 if kind.endswith("NO") else 2, kind)


def test_processes_that_came_up_alone_stop(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(UserError, match=r"launched 4 processes but accelerate set up 1 \(NO\).*cpu-2proc.yaml"):
        check_launch(1, "DistributedType.NO")


def test_plain_tensors_pass_through_unchanged():
    layer = torch.nn.Linear(3, 2)
    assert not model_is_sharded(layer)
    original = layer.state_dict()
    state = full_tensors(original)
    assert all(state[k] is v for k, v in original.items())
    other = torch.nn.Linear(3, 2)
    load_full_state_dict(other, state)
    assert torch.equal(other.weight, layer.weight)


def _configs(tmp_path, recipe: dict | None = None, every_stage: bool = True):
    """SFT (and GRPO and RM) configs as a recipe would give them (no model is loaded)."""
    import yaml

    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.recipe import load_config
    from posttrain.rm.config import RMRecipeConfig
    from posttrain.sft.config import SFTRecipeConfig

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"gradient_accumulation_steps": 4, **(recipe or {})}))
    return [load_config(schema, path, {"output_dir": str(tmp_path / schema.__name__)})
            for schema in (SFTRecipeConfig, GRPORecipeConfig, RMRecipeConfig)[:3 if every_stage else 1]]


def test_under_fsdp_gradient_accumulation_reduce_scatters_every_micro_batch(tmp_path, monkeypatch):
    """Trainer's no_sync is FSDP2's set_requires_gradient_sync(False): every GPU would keep the whole
    model's unsharded gradients until the last micro-batch (1.3 TB for V3). So an FSDP launch syncs each batch."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for cfg in _configs(tmp_path):
        assert cfg.accelerator_config.gradient_accumulation_kwargs == {"sync_each_batch": True}, type(cfg).__name__
    # the recipe's own choice stands
    mine = {"accelerator_config": {"gradient_accumulation_kwargs": {"sync_each_batch": False}}}
    for cfg in _configs(tmp_path, mine, every_stage=False):
        assert cfg.accelerator_config.gradient_accumulation_kwargs == {"sync_each_batch": False}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # DDP keeps accelerate's no_sync (nothing is sharded)
    for cfg in _configs(tmp_path, every_stage=False):
        assert cfg.accelerator_config.gradient_accumulation_kwargs is None
