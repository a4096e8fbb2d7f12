"""The demo learns on whatever machine runs the suite (issue #12; also issue #6's learning test).

`make demo` runs `recipes/tiny-arith.yaml` as shipped: init, distill, 400 SFT steps on the built-in
`digits` level, 100 GRPO steps (dynamic sampling, closed-loop MTP weight) on its `max_operand=4`
part, and a held-out evaluation of every stage on 500 test-split problems of that part. This test
runs that recipe unchanged, in a fresh process as a user would, on this machine's CPU with its own
floating-point paths (CI's, whatever its vendor), and checks the acceptance on what it computed:

- GRPO − SFT ≥ +5 points of held-out pass@1 (DeepSeek-R1 §3.1: 8 samples per problem at T 0.6),
  with the paired 95% interval, counted over the 21 facts the problems word, above zero;
- MTP acceptance at the end of GRPO at or above its start: the GRPO checkpoint's drafter accepted on
  at least as large a share of its own held-out answers as the SFT checkpoint's on its answers, on
  the same problems and sampling seeds (the eval stage's `mtp_acceptance`), with λ closed-loop and > 0.
  (The training log's first and last 10 steps sample other prompts, so it is printed, not tested.);
- issue #6: the training reward of the last 10 steps above the first 10, and held-out greedy
  accuracy up by at least MARGIN (one fact of 21 is about 5 points).

Measured (benchmarks/RESULTS.md, "GRPO that visibly learns", session 8): R1 pass@1 +0.09 to +0.30,
interval lower bounds +0.025 to +0.130, in 10 runs over three seeds and three sets of floating-point
paths; the drafter's acceptance on the eval's answers, GRPO − SFT, +0.013 to +0.084, each interval
above zero (session 9; in the GRPO log, seed 1 ended up to 1 point below its start in two runs);
greedy +0.03 to +0.37. About 7 minutes of one core.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-arith.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MIN_GAIN = 0.05      # issue #12: GRPO − SFT, R1 pass@1
GRPO_STEPS = 100     # the recipe's run length (asserted below, so a recipe change shows here)
MARGIN = 0.04        # issue #6: held-out greedy accuracy gain


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    import torch

    out = tmp_path_factory.mktemp("demo") / "tiny-arith"
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}
    print(f"\n[demo] on {_cpu_model()} (torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')})")
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", str(RECIPE), "--output_dir", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=40 * 60)
    if r.returncode != 0:
        pytest.fail(f"the demo exited {r.returncode}:\n{(r.stdout + r.stderr)[-6000:]}", pytrace=False)
    return out


def test_the_demo_s_grpo_beats_sft_on_held_out_pass1_beyond_noise_and_keeps_mtp_acceptance(demo_run):
    from eval_hooks.report import _first_and_last_means

    results = json.loads((demo_run / "results.json").read_text())
    history = json.loads((demo_run / "grpo" / "trainer_state.json").read_text())["log_history"]
    sft, grpo = results["sft"], results["grpo"]
    r1 = grpo["sampled_pass1"]["vs_sft"]
    greedy = grpo["vs_sft"]
    rewards = [h["reward"] for h in history if "reward" in h]
    accept = [h["mtp/accept_rate"] for h in history if "mtp/accept_rate" in h]
    lambdas = [h["mtp_loss_weight"] for h in history if "mtp_loss_weight" in h]
    # the report's first-vs-last means (10 steps each over a 100-step run): what report.md prints
    _, reward_first, reward_last = _first_and_last_means(rewards)
    _, mtp_first, mtp_last = _first_and_last_means(accept)
    drafter = grpo["mtp_acceptance"]["vs_sft"]
    print(f"[demo] R1 pass@1 SFT {sft['sampled_pass1']['pass@1']:.3f} -> GRPO {grpo['sampled_pass1']['pass@1']:.3f}: "
          f"{r1['difference']:+.3f} [{r1['ci95'][0]:+.3f}, {r1['ci95'][1]:+.3f}] over {r1['groups']} facts; "
          f"greedy {sft['accuracy']:.3f} -> {grpo['accuracy']:.3f} ({greedy['difference']:+.3f} "
          f"[{greedy['ci95'][0]:+.3f}, {greedy['ci95'][1]:+.3f}]); training reward {reward_first:.3f} -> "
          f"{reward_last:.3f}; MTP acceptance on the eval's answers {sft['mtp_acceptance']['mean']:.3f} -> "
          f"{grpo['mtp_acceptance']['mean']:.3f} ({drafter['difference']:+.3f} [{drafter['ci95'][0]:+.3f}, "
          f"{drafter['ci95'][1]:+.3f}]), in the GRPO log {mtp_first:.3f} -> {mtp_last:.3f}; "
          f"λ in [{min(lambdas):.3f}, {max(lambdas):.3f}]")

    assert len(rewards) == GRPO_STEPS and len(accept) == GRPO_STEPS
    assert r1["groups"] == 21 and r1["n"] == 500
    # issue #12: a gain that is not noise, on this machine's rounding
    assert r1["difference"] >= MIN_GAIN, r1
    assert r1["ci95"][0] > 0, r1
    assert drafter["n"] >= 450 and drafter["difference"] >= 0, drafter  # n: problems both stages drafted on
    assert min(lambdas) > 0  # the closed loop never turns the MTP loss off
    # issue #6: GRPO raises the mean reward and held-out greedy accuracy above the SFT checkpoint's
    assert reward_last > reward_first + 0.03, (reward_first, reward_last)
    assert greedy["difference"] >= MARGIN, greedy
