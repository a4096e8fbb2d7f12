"""Resuming picks the newest checkpoint that was written to the end (a kill during a save leaves a partial one)."""

from __future__ import annotations

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
