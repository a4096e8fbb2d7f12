"""Scale-out on one machine: `accelerate launch` with 2 CPU processes (gloo) runs SFT and GRPO, and
for the same global batch and seed its losses match the single-process run's.

This is the data-parallel code path multi-node runs take (balancing counts are all-reduced, the
loss is normalised by the global token count, DDP averages the gradients)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_2PROC = ROOT / "recipes" / "accelerate" / "cpu-2proc.yaml"

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    # Both runs on the CPU, also on a machine with a GPU: with GPUs visible accelerate sets up NCCL
    # (one GPU per rank, so 2 ranks on 1 GPU fail) and the 1-process run would train on the GPU.
    return {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": ""}


def _run(args: list[str], nproc: int, timeout: int = 900) -> None:
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_2PROC),
               str(ROOT / "cli.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    if r.returncode != 0:  # pytest.fail keeps the whole message (an assert's repr is cut short)
        pytest.fail(f"{' '.join(cmd[:6])} ... exited {r.returncode}\n--- stderr (tail) ---\n{r.stderr[-6000:]}"
                    f"\n--- stdout (tail) ---\n{r.stdout[-2000:]}", pytrace=False)


def _losses(out: Path, key: str = "loss") -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h and "step" in h}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    import random

    from data_pipelines.arith_task import generate_split, scripted_trace

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("scaleout") / "sft.jsonl"
    with path.open("w") as f:
        for row in generate_split("train", 64, seed=0):
            msgs = row["prompt"] + [{"role": "assistant", "content": scripted_trace(row, rng)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_sft_two_processes_match_one(tmp_path, tiny_model_dir, sft_data):
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(sft_data), "--max_steps", "4",
              "--max_length", "256", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
              "--seed", "0", "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0"]
    _run(["sft", *common, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "one")], nproc=1)
    _run(["sft", *common, "--per_device_train_batch_size", "1", "--output_dir", str(tmp_path / "two")], nproc=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-3), (step, one, two)
    # SFT's own metrics are over all ranks, as Trainer's loss is: the main-head loss and the token count
    # were rank 0's alone (num_tokens about half the 1-process run's)
    for key, rel in (("lm_loss", 2e-3), ("num_tokens", 0)):
        one, two = _losses(tmp_path / "one", key), _losses(tmp_path / "two", key)
        assert sorted(one) == sorted(two) == [1, 2, 3, 4]
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=rel), (key, step, one, two)


def test_grpo_two_processes_match_one(tmp_path, tiny_model_dir):
    common = ["--model_name_or_path", str(tiny_model_dir), "--max_steps", "2", "--num_generations", "4",
              "--max_completion_length", "12", "--learning_rate", "1e-3", "--save_strategy", "no", "--seed", "0",
              "--use_vllm", "false", "--max_prompts", "16", "--beta", "0.01", "--logging_steps", "1",
              "--reward_funcs", f"math_accuracy,{ROOT / 'tests' / 'rewards_for_tests.py'}:length_reward"]
    _run(["grpo", *common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")], nproc=1)
    _run(["grpo", *common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two")], nproc=2)
    for key in ("loss", "reward"):
        one, two = _losses(tmp_path / "one", key), _losses(tmp_path / "two", key)
        assert sorted(one) == sorted(two) == [1, 2]
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=2e-3, abs=1e-5), (key, step, one, two)


def test_cli_tears_down_the_process_group_before_exit(monkeypatch):
    """A rank that exits with its gloo group alive can abort in static destruction (SIGABRT; seen
    in CI on the 2-process SFT run), so `main` barriers and destroys the group when a command ends."""
    import torch.distributed as dist

    import cli

    def fake_command(argv: list[str]) -> int:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        return 0

    monkeypatch.setitem(cli.HANDLERS, "fake-distributed", fake_command)
    try:
        assert cli.main(["fake-distributed"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
