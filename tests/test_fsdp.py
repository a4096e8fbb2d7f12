"""FSDP2, the path past one GPU, on a CPU gloo group (on a machine with GPUs too: every run here is
launched with them hidden, CUDA_VISIBLE_DEVICES="").

The shipped accelerate configs (`recipes/accelerate/fsdp2-1node.yaml`, `fsdp2-deepseek-v3.yaml`)
are launched as they are with `accelerate launch`, so torch's `fully_shard` wraps every decoder
layer and the MTP layer, RAM-efficient loading broadcasts rank 0's weights (buffers included)
and activation checkpointing wraps the same layers — exactly as on GPUs. accelerate itself only
sets up FSDP on accelerator backends, so `tests/fsdp_cpu_launch.py` turns its CPU state into FSDP
(and nothing else). Each run is a fresh set of processes, as a user's restart is.

The CPU runs train in fp32 (`--mixed_precision no`) where losses are compared: bf16 would be
several times slower on CPU and hide differences below its rounding. The 671B config also runs
as shipped, with bf16 mixed precision.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "recipes" / "accelerate"
SHIM = ROOT / "tests" / "fsdp_cpu_launch.py"

pytestmark = pytest.mark.slow

# Two processes see the same global batch as one (per-device batch 1 x 2 ranks vs 2 x 1), so the
# losses differ only by fp32 summation order in the gradient reduce-scatter and the loss
# normalisation: measured 2e-6 relative. 1e-4 leaves room for other CPUs' kernels, and is far
# below what a wrong sharding would give (a missing rank's gradient or a double count moves the
# loss by > 1e-2 within 4 steps at lr 1e-3).
LOSS_RTOL = 1e-4


def _env() -> dict[str, str]:
    # Every run on the CPU, also on a machine with a GPU: with GPUs visible accelerate sets up NCCL
    # and one GPU per rank (2 ranks on 1 GPU fail), and the plain run would train on the GPU while
    # the sharded ones it is compared with run on the CPU. tests/fsdp_cpu_launch.py keeps FSDP2's
    # mesh on the CPU under a CUDA build of torch.
    return {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_KVCACHE_SPACE": "1", "CUDA_VISIBLE_DEVICES": ""}


def _launch(config: str, nproc: int, args: list[str], *, shim: bool = True, extra: list[str] = (),
            expect_rc: int = 0, port: int = 29541, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
           "--num_machines", "1", "--num_processes", str(nproc), "--main_process_port", str(port), *extra,
           str(SHIM if shim else ROOT / "cli.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), **(env or {})}, timeout=900, cwd=ROOT)
    if r.returncode != expect_rc:
        pytest.fail(f"{' '.join(cmd[4:12])} ... exited {r.returncode}, expected {expect_rc}\n--- stderr (tail) ---\n"
                    f"{r.stderr[-6000:]}\n--- stdout (tail) ---\n{r.stdout[-2000:]}", pytrace=False)
    return r


def _single(args: list[str]) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, env=_env(),
                       timeout=900, cwd=ROOT)
    if r.returncode != 0:
        pytest.fail(f"cli.py {' '.join(args[:2])} exited {r.returncode}\n{r.stderr[-6000:]}", pytrace=False)


def _log(out: Path, key: str = "loss") -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h and "step" in h}


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(directory.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    import random

    from data_pipelines.arith_task import generate_split, scripted_trace

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("fsdp-data") / "sft.jsonl"
    with path.open("w") as f:
        for row in generate_split("train", 64, seed=0):
            msgs = row["prompt"] + [{"role": "assistant", "content": scripted_trace(row, rng)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def _sft_args(model: Path, data: Path, out: Path, per_device: int) -> list[str]:
    return ["sft", "--model_name_or_path", str(model), "--dataset_name", str(data), "--max_steps", "4",
            "--max_length", "256", "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "0",
            "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0", "--report_to", "none",
            "--per_device_train_batch_size", str(per_device), "--output_dir", str(out),
            "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_model_dir, sft_data) -> dict[str, Path]:
    """The same 4 SFT steps (MTP loss, balancing, seq-wise balance loss as the recipe defaults have
    them): one plain process, FSDP2 with 1 and with 2 processes (fsdp2-1node.yaml as shipped)."""
    base = tmp_path_factory.mktemp("fsdp-sft")
    runs = {"plain": base / "plain", "fsdp1": base / "fsdp1", "fsdp2": base / "fsdp2"}
    _single(_sft_args(tiny_model_dir, sft_data, runs["plain"], per_device=2))
    fp32 = ["--mixed_precision", "no"]
    _launch("fsdp2-1node.yaml", 1, _sft_args(tiny_model_dir, sft_data, runs["fsdp1"], per_device=2), extra=fp32)
    _launch("fsdp2-1node.yaml", 2, _sft_args(tiny_model_dir, sft_data, runs["fsdp2"], per_device=1), extra=fp32)
    return runs


@pytest.mark.parametrize("run", ["fsdp1", "fsdp2"])
def test_sft_under_fsdp2_matches_the_single_process_losses(sft_runs, run):
    plain, sharded = _log(sft_runs["plain"]), _log(sft_runs[run])
    assert sorted(plain) == sorted(sharded) == [1, 2, 3, 4]
    for step in plain:
        assert sharded[step] == pytest.approx(plain[step], rel=LOSS_RTOL), (step, plain, sharded)
    # the MTP loss and balancing took part (they are in the logged objective)
    logged = {k for h in json.loads((sft_runs[run] / "trainer_state.json").read_text())["log_history"] for k in h}
    assert {"mtp_loss", "moe/maxvio", "moe/seq_balance_loss"} <= logged


def test_sft_under_fsdp2_trains_the_mtp_module(sft_runs, tiny_model_dir):
    """Every MTP tensor moved: the MTP block got gradients through FSDP's hooks (before, it ran
    outside them and failed with mixed Tensor/DTensor)."""
    import transformers

    n_main = transformers.AutoConfig.from_pretrained(tiny_model_dir).num_hidden_layers
    init, trained = _safetensors(tiny_model_dir), _safetensors(sft_runs["fsdp2"])
    mtp = [k for k in init if k.startswith(f"model.layers.{n_main}.")]
    assert any(".eh_proj." in k for k in mtp) and any(".experts.0." in k for k in mtp)
    unchanged = [k for k in mtp if torch.equal(init[k], trained[k])]
    assert not unchanged, unchanged


def test_fsdp2_checkpoint_is_the_deepseek_layout_and_loads_in_transformers(sft_runs):
    from transformers import AutoModelForCausalLM

    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    for directory in (sft_runs["fsdp2"], sft_runs["fsdp2"] / "checkpoint-2"):
        state = _safetensors(directory)
        assert not any("gate_up_proj" in k for k in state), "fused expert names in a DeepSeek-layout checkpoint"
        n_main = json.loads((directory / "config.json").read_text())["num_hidden_layers"]
        assert f"model.layers.{n_main}.eh_proj.weight" in state
        assert f"model.layers.{n_main}.mlp.experts.0.gate_proj.weight" in state
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in state
        plain = AutoModelForCausalLM.from_pretrained(directory)
        assert type(plain).__name__ == "DeepseekV3ForCausalLM"
        with_mtp = DeepseekV3ForCausalLMWithMTP.from_pretrained(directory)
        live = with_mtp.state_dict()
        assert torch.equal(live[f"model.layers.{n_main}.eh_proj.weight"], state[f"model.layers.{n_main}.eh_proj.weight"])
    # the sharded run's weights are the single-process run's, up to Adam's reaction to fp32
    # reduction order on 4 steps at lr 1e-3 (measured 2e-3 at most)
    one, two = _safetensors(sft_runs["plain"]), _safetensors(sft_runs["fsdp2"])
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 2e-2


def test_fsdp2_resume_in_fresh_processes_equals_the_uninterrupted_run(sft_runs, tiny_model_dir, sft_data, tmp_path):
    """Restart from checkpoint-2 of the 2-process run (model weights through the DeepSeek-layout
    loader into the sharded model, FSDP optimizer state, RNG): steps 3 and 4 log the same losses.
    Only rank 0 reads the checkpoint's weights, once (each rank reading all of them held the whole
    model twice per rank: 5.5 TB each for V3's fp32 master weights)."""
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(sft_runs["fsdp2"] / "checkpoint-2", out / "checkpoint-2")
    args = _sft_args(tiny_model_dir, sft_data, out, per_device=1) + ["--resume_from_checkpoint", "true"]
    reads = tmp_path / "reads.log"
    _launch("fsdp2-1node.yaml", 2, args, extra=["--mixed_precision", "no"], env={"POSTTRAIN_TEST_READ_LOG": str(reads)})
    uninterrupted, resumed = _log(sft_runs["fsdp2"]), _log(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert [resumed[s] for s in (3, 4)] == [uninterrupted[s] for s in (3, 4)]
    by_rank: dict[str, int] = {}
    for line in reads.read_text().splitlines():
        rank, size = line.split()
        by_rank[rank] = by_rank.get(rank, 0) + int(size)
    weights = sum(t.numel() * t.element_size() for t in _safetensors(out / "checkpoint-2").values())
    assert by_rank == {"0": weights}, (by_rank, weights)


def test_the_671b_config_runs_as_shipped(tmp_path, tiny_model_dir, sft_data):
    """fsdp2-deepseek-v3.yaml on 2 processes as shipped (bf16 mixed precision, SHARDED_STATE_DICT,
    RAM-efficient loading, activation checkpointing): trains, and its checkpoint is still a
    DeepSeek-layout directory (transformers alone would write none under SHARDED_STATE_DICT)."""
    out = tmp_path / "v3"
    args = _sft_args(tiny_model_dir, sft_data, out, per_device=1)
    args[args.index("--max_steps") + 1] = "2"
    _launch("fsdp2-deepseek-v3.yaml", 2, args)
    assert sorted(_log(out)) == [1, 2]
    state = _safetensors(out / "checkpoint-2")
    assert "model.layers.2.eh_proj.weight" in state and not any("gate_up_proj" in k for k in state)


def test_the_one_gpu_config_keeps_fp32_master_weights_and_computes_in_bf16(sft_runs, tmp_path, tiny_model_dir, sft_data):
    """recipes/accelerate/fsdp2-1gpu.yaml as shipped (one rank, bf16 mixed precision): the weights the
    optimizer steps, and the checkpoint, stay float32 while the forward runs in bf16 -- its first loss is the
    fp32 run's to bf16 rounding, not exactly."""
    out = tmp_path / "one"
    args = _sft_args(tiny_model_dir, sft_data, out, per_device=2)
    args[args.index("--max_steps") + 1] = "2"
    _launch("fsdp2-1gpu.yaml", 1, args, port=29549)
    first, plain = _log(out)[1], _log(sft_runs["plain"])[1]
    assert first != plain and first == pytest.approx(plain, rel=2e-2)
    state = _safetensors(out / "checkpoint-2")
    assert state and {t.dtype for t in state.values()} == {torch.float32}


def test_fp8_under_fsdp2_matches_the_single_process_fp8_run(tmp_path, tiny_model_dir, sft_data):
    """`fp8: true` on 2 FSDP2 ranks: there the per-step FP8 weight cache is off, each FP8 layer's backward
    quantizes again from the weight FSDP gathers again for it (tests/test_fp8_experts_grouped.py: no FP8
    weight is kept from the forward). The losses follow the single-process FP8 run. FP8 rounding is not
    continuous: gradients that differ in fp32 summation order can move a weight across an e4m3 rounding
    boundary, so the tolerance is 1e-3 (measured 4e-5 at step 2), still far below a wrong sharding's > 1e-2."""
    runs = {}
    for name, nproc, per_device in (("plain", 0, 2), ("fsdp2", 2, 1)):
        runs[name] = tmp_path / name
        args = _sft_args(tiny_model_dir, sft_data, runs[name], per_device=per_device) + ["--fp8", "true"]
        args[args.index("--max_steps") + 1] = "2"  # step 2's loss follows one update from sharded gradients
        args[args.index("--save_strategy") + 1] = "no"
        if nproc:
            _launch("fsdp2-1node.yaml", nproc, args, extra=["--mixed_precision", "no"], port=29547)
        else:
            _single(args)
    plain, sharded = _log(runs["plain"]), _log(runs["fsdp2"])
    assert sorted(plain) == sorted(sharded) == [1, 2]
    for step in plain:
        assert sharded[step] == pytest.approx(plain[step], rel=1e-3), (step, plain, sharded)


@pytest.mark.vllm  # grpo-tiny.yaml: use_vllm: true, vllm_mode: colocate
def test_grpo_under_fsdp2_syncs_full_weights_into_each_ranks_engine(tmp_path, tiny_model_dir):
    """Two ranks, each with its colocated vLLM engine: every sync all-gathers the sharded weights
    layer by layer into each engine. At step 2 the engine samples with step 1's weights, and its
    log-probs of the sampled tokens equal the trainer's (TRL's `sampling_logp_difference`) to
    <= 1e-3 — with lr 1e-3 a missed or partial sync would show as a difference of order 0.1.
    The recipe's beta > 0 makes TRL build a reference model: at step 1 it is the policy, KL 0. (Sharded by
    TRL as one unit from what each rank held, under RAM-efficient loading rank 1's shards were empty:
    KL 0.03; now prepared as the policy is, weights broadcast from rank 0.)"""
    out = tmp_path / "grpo"
    args = ["grpo", "--recipe", str(ROOT / "recipes" / "grpo-tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
            "--max_steps", "2", "--num_generations", "4", "--max_completion_length", "12",
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--save_strategy", "no",
            "--max_prompts", "16", "--report_to", "none", "--output_dir", str(out)]
    _launch("fsdp2-1node.yaml", 2, args, extra=["--mixed_precision", "no"])
    diff = _log(out, "rollout/logprob_diff_max")
    assert sorted(diff) == [1, 2]
    assert diff[2] <= 1e-3, diff
    assert _log(out, "kl")[1] == pytest.approx(0.0, abs=1e-6)
    state = _safetensors(out)
    assert "model.layers.2.eh_proj.weight" in state and not any("gate_up_proj" in k for k in state)


def test_an_fsdp_config_on_a_machine_without_gpus_stops_with_one_line(tmp_path, tiny_model_dir, sft_data):
    """Without the test shim, accelerate on CPU does not set up FSDP: the run stops with one line
    that points to the CPU data-parallel config, instead of training without the sharding asked for.
    (On a machine with GPUs too: the launch does not see them, see `_env`.)"""
    r = _launch("fsdp2-1node.yaml", 2, _sft_args(tiny_model_dir, sft_data, tmp_path / "x", per_device=1),
                shim=False, expect_rc=1, extra=["--mixed_precision", "no"])
    # Both ranks write to one stderr pipe, so a line may begin after the other rank's progress bar
    # (tqdm ends with "\r", not "\n"); and torchrun SIGTERMs the other rank once one has exited, which
    # can come before that rank's line. So: one or two error lines, each the whole message.
    errors = re.findall(r"dsv3-posttrain sft: error: [^\r\n]*", r.stderr)
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, r.stderr[-3000:]
    assert "asks for FSDP, which needs GPUs" in errors[0] and "recipes/accelerate/cpu-2proc.yaml" in errors[0]
    assert errors[0].endswith("cpu-2proc.yaml"), errors[0]  # nothing follows the hint on its line
    # the ranks print no traceback; the one there is the launcher's report of their exit status 2
    assert r.stderr.count("Traceback") == 1 and "ChildFailedError" in r.stderr and "exitcode  : 2" in r.stderr
    assert not (tmp_path / "x" / "model.safetensors").exists()

