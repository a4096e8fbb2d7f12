"""`dsv3-posttrain run`: stages chained through a manifest; a killed SFT resumes; the report is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _mini_recipe(tmp_path: Path) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-arith.yaml").read_text())
    recipe["name"] = "mini"
    st = recipe["stages"]
    st["distill"]["max_prompts"] = 60
    st["sft"].update(max_steps=24, save_steps=4, logging_steps=2, save_total_limit=3)
    st["grpo"].update(max_steps=2, per_device_train_batch_size=16, max_completion_length=24, save_steps=1)
    st["eval"].update(num_problems=8, max_tokens=24, every_n_steps=2, during_training_problems=8)
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(recipe: Path, out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", str(recipe), "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def test_killed_sft_resumes_and_the_report_is_written(tmp_path):
    recipe, out = _mini_recipe(tmp_path), tmp_path / "run"
    proc = _run(recipe, out)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill once SFT has written a checkpoint
        if list((out / "sft").glob("checkpoint-*")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before SFT checkpointed:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["distill"]["status"] == "done"
    assert manifest["stages"]["sft"]["status"] == "running"
    killed_at = sorted(int(p.name.split("-")[1]) for p in (out / "sft").glob("checkpoint-*"))[-1]

    proc = _run(recipe, out)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    assert "[distill] done already" in log
    assert "[sft] resuming" in log
    state = json.loads((out / "sft" / "trainer_state.json").read_text())
    assert state["global_step"] == 24
    # the resumed run went on to the last step
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps and max(steps) == 24 and killed_at >= 4

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"init", "sft", "grpo"}
    for stage in results.values():
        assert stage["n"] == 8 and 0.0 <= stage["accuracy"] <= 1.0
    report = (out / "report.md").read_text()
    assert "Held-out accuracy" in report and (out / "accuracy.png").exists() and (out / "loss.png").exists()
    # the evaluation callback ran inside SFT and GRPO (eval stage's every_n_steps)
    grpo_state = json.loads((out / "grpo" / "trainer_state.json").read_text())
    for hist, last in ((state["log_history"], 24), (grpo_state["log_history"], 2)):
        evals = [h for h in hist if "eval/accuracy" in h]
        assert evals and evals[-1]["step"] == last and evals[-1]["eval/n"] == 8, evals
    assert (out / "accuracy_during_training.png").exists()

    # The state a kill during the eval stage leaves once its first checkpoint is done (the manifest says
    # "running", the other checkpoints' results are not written; a real kill would race the eval's seconds):
    # a restart in a fresh process evaluates only the others, and gets what the whole run got.
    eval_dir = out / "eval"
    whole = {name: json.loads((eval_dir / f"{name}.json").read_text()) for name in ("sft", "grpo")}
    init_written = (eval_dir / "init.json").stat().st_mtime_ns
    for name in whole:
        (eval_dir / f"{name}.json").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["eval"]["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = _run(recipe, out)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    assert "[eval] resuming" in log and "[eval] init: done already" in log and "[eval] sft: accuracy" in log
    assert (eval_dir / "init.json").stat().st_mtime_ns == init_written
    for name, before in whole.items():
        again = json.loads((eval_dir / f"{name}.json").read_text())
        for key in ("correct", "sampled_pass1", "mtp_acceptance"):
            assert again[key] == before[key], (name, key)
    assert json.loads((out / "results.json").read_text()) == results

    # the next run finds everything done and only rewrites the report
    proc = _run(recipe, out)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and log.count("done already") == 5, log[-2000:]


def test_a_stage_whose_inputs_changed_starts_afresh_and_keeps_the_earlier_output(tmp_path, capsys):
    """Before, SFT and GRPO resumed from whatever checkpoint their directory held: rerunning the chain
    with another GRPO temperature "resumed" the old run at max_steps, trained nothing and reported the
    old model as the new one."""
    from eval_hooks.chain import run_chain

    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-arith.yaml").read_text())
    recipe["name"] = "rerun"
    recipe["stages"] = {"init": recipe["stages"]["init"],
                        "distill": {**recipe["stages"]["distill"], "max_prompts": 40, "disable_tqdm": True},
                        "sft": {**recipe["stages"]["sft"], "max_steps": 4, "save_steps": 2, "logging_steps": 1,
                                "disable_tqdm": True}}
    path, out = tmp_path / "rerun.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(recipe))
    run_chain(path, str(out))
    first = json.loads((out / "sft" / "trainer_state.json").read_text())

    run_chain(path, str(out))  # unchanged: skipped
    assert "[sft] done already" in capsys.readouterr().out and not list(tmp_path.glob("run/sft.replaced-*"))

    recipe["stages"]["sft"]["learning_rate"] = 1e-4
    path.write_text(yaml.safe_dump(recipe))
    run_chain(path, str(out))
    printed = capsys.readouterr().out
    assert "[sft] its inputs changed since" in printed and "[sft] starting" in printed
    kept = out / "sft.replaced-1"
    assert json.loads((kept / "trainer_state.json").read_text()) == first  # the earlier run, untouched
    state = json.loads((out / "sft" / "trainer_state.json").read_text())
    losses = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in losses] == [1, 2, 3, 4]  # trained from step 1, not resumed at step 4
    assert losses[-1]["learning_rate"] != [h for h in first["log_history"] if "loss" in h][-1]["learning_rate"]
    assert "[distill] done already" in printed  # the unchanged stage before it is not redone

    run_chain(path, str(out), only=["sft"])  # the stages before it count as they are, run or not
    printed = capsys.readouterr().out
    assert "[sft] done already" in printed and not (out / "sft.replaced-2").exists()

    # killed while writing SFT's first checkpoint: trainer_state.json written, the balancer's state not yet
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["sft"]["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "sft")
    shutil.copytree(kept / "checkpoint-2", out / "sft" / "checkpoint-2")
    (out / "sft" / "checkpoint-2" / "moe_balancer.pt").unlink()
    run_chain(path, str(out))  # before: "no complete checkpoint-N to resume from", at every rerun
    assert "[sft] resuming" in capsys.readouterr().out
    state = json.loads((out / "sft" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]  # nothing to resume: afresh


@pytest.mark.parametrize("reward, message", [
    ("math_acuracy", "unknown reward 'math_acuracy'"),
    ("{tmp}/r.py:nope", "nope"),
    ("reward_model:{tmp}/no-rm", "no reward model directory at"),
])
def test_a_bad_grpo_reward_stops_the_chain_before_its_first_stage(tmp_path, capsys, reward, message):
    """`run --validate` said "valid" and `run` went through init, distill and SFT before GRPO named the typo,
    without naming the recipe or the field."""
    import cli

    (tmp_path / "r.py").write_text("def yes(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "output_dir": str(tmp_path / "out"), "stages": {
        "init": {"preset": "tiny"}, "grpo": {"reward_funcs": [reward.format(tmp=tmp_path)], "max_steps": 1}}}))
    for argv in (["run", str(recipe), "--validate"], ["run", str(recipe)]):
        assert cli.main(argv) == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert f"{recipe} (stages.grpo): reward_funcs: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # no stage ran
    recipe.write_text(recipe.read_text().replace(reward.format(tmp=tmp_path), f"{tmp_path}/r.py:yes"))
    assert cli.main(["run", str(recipe), "--validate"]) == 0
