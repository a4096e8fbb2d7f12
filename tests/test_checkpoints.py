"""Resuming picks the newest checkpoint that was written to the end (a kill during a save leaves a partial one)."""

from __future__ import annotations

import pytest

from posttrain.checkpoints import last_complete_checkpoint


def _ckpt(root, step, state="{}", extra=()):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if state is not None:
        (d / "trainer_state.json").write_text(state)
    for name in extra:
        (d / name).write_text("x")
    return str(d)


def test_newest_complete_checkpoint_wins(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    assert last_complete_checkpoint(tmp_path) is None
    two = _ckpt(tmp_path, 2, extra=["moe_balancer.pt"])
    ten = _ckpt(tmp_path, 10)  # numeric order: 10 is newer than 2 and 9
    _ckpt(tmp_path, 9, extra=["moe_balancer.pt"])
    _ckpt(tmp_path, 12, state="{not json")  # killed while writing trainer_state.json
    _ckpt(tmp_path, 14, state=None)  # killed before it
    (tmp_path / "checkpoint-latest").mkdir()
    assert last_complete_checkpoint(tmp_path) == ten
    assert last_complete_checkpoint(tmp_path, ["moe_balancer.pt"]) == str(tmp_path / "checkpoint-9")
    assert two != last_complete_checkpoint(tmp_path, ["moe_balancer.pt"])


# --- the DeepSeek-layout loader (resume) ----------------------------------------------------------
def _trained_and_fresh(tiny_model_dir, tmp_path):
    """A checkpoint whose every tensor differs from the tiny model's, and a fresh tiny model."""
    import torch

    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    trained = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for t in trained.state_dict().values():
            t.add_(0.5)
    trained.save_pretrained(tmp_path / "ckpt")
    return trained, DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir), tmp_path / "ckpt"


def test_resume_loads_the_checkpoint_one_layer_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    """At most one decoder layer's tensors (and their fused copy) are in host memory at once: loading the
    whole checkpoint at once held the model twice on every rank (2.7 TB each for V3's fp32 master weights)."""
    import re

    import torch

    import posttrain.distributed as distributed
    from posttrain.checkpoints import load_deepseek_checkpoint

    trained, fresh, ckpt = _trained_and_fresh(tiny_model_dir, tmp_path)
    calls: list[set[str]] = []
    real = distributed.load_full_state_dict

    def recording(model, state, **kwargs):
        calls.append(set(state))
        return real(model, state, **kwargs)

    monkeypatch.setattr(distributed, "load_full_state_dict", recording)
    assert load_deepseek_checkpoint(fresh, ckpt)
    layers = [{m.group(1) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))} for keys in calls]
    assert all(len(layer) <= 1 for layer in layers), layers  # one layer per call (the rest: embedding, norm, head)
    assert len(calls) == trained.config.num_hidden_layers + trained.config.num_nextn_predict_layers + 1
    expected = trained.state_dict()
    assert set().union(*calls) == set(expected)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())


def test_resume_from_a_checkpoint_of_another_model_names_the_mismatch(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from posttrain.checkpoints import load_deepseek_checkpoint
    from posttrain.errors import UserError

    _, fresh, ckpt = _trained_and_fresh(tiny_model_dir, tmp_path)
    (path,) = ckpt.glob("model*.safetensors")
    original = load_file(path)
    narrow = {**original, "model.layers.0.self_attn.o_proj.weight": original["model.layers.0.self_attn.o_proj.weight"][:, :-1]}
    save_file({k: v.contiguous() for k, v in narrow.items()}, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"(?s)does not match the model: .*model\.layers\.0\.self_attn\.o_proj\.weight"):
        load_deepseek_checkpoint(fresh, ckpt)
    save_file({k: v for k, v in original.items() if k != "model.layers.1.mlp.experts.3.up_proj.weight"}, path,
              metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"(?s)does not match the model: .*experts\.3\.up_proj"):
        load_deepseek_checkpoint(fresh, ckpt)
    save_file({k: v for k, v in original.items() if k != "model.norm.weight"}, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"(?s)does not match the model: .*model\.norm\.weight"):
        load_deepseek_checkpoint(fresh, ckpt)
