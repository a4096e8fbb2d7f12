"""GRPO step time with TIS's old-policy log-probs from the training forward vs from TRL's separate forward.

`old_logps_from_training_forward: true` (the default) takes them from the loss's own forward when the
rollouts are on-policy; `false` is TRL's way with vLLM: a no-grad forward over the whole generation
batch before training (and over every round of dynamic sampling, the groups it drops included). Both
runs train on the same rollouts and log the same losses; this times them, alternating in one
process, and reports medians over repeats of the per-step medians (step 1, the engine's warm-up,
dropped).

    python benchmarks/bench_grpo_old_logps.py --demo             # the demo recipe's GRPO stage (dynamic
                                                                 # sampling) from its SFT checkpoint
    python benchmarks/bench_grpo_old_logps.py --sft DIR          # the same from an SFT checkpoint already made
    python benchmarks/bench_grpo_old_logps.py --presets tiny small   # bench_grpo.py's set-up (no dynamic sampling)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_grpo's configuration
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

KEYS = ("timing/step", "timing/training", "timing/generation", "timing/extra_rounds")


def demo_grpo_config(sft_dir: str, out_dir: str, steps: int, in_loss: bool):
    """The GRPO stage of recipes/tiny-arith.yaml, shortened to `steps` and not saved."""
    import yaml

    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.recipe import build_config

    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-arith.yaml").read_text())
    stage = dict(recipe["stages"]["grpo"])
    for key in ("save_steps", "save_total_limit"):
        stage.pop(key, None)
    stage.update(model_name_or_path=sft_dir, output_dir=out_dir, max_steps=steps, save_strategy="no",
                 seed=recipe["seed"], report_to="none", disable_tqdm=True, logging_steps=1,
                 old_logps_from_training_forward=in_loss)
    return build_config(GRPORecipeConfig, stage)


def preset_grpo_config(model_dir: str, out_dir: str, steps: int, in_loss: bool, G: int, prompts: int, length: int):
    """bench_grpo.py's run: G x prompts completions of exactly `length` tokens, math_accuracy."""
    from bench_grpo import grpo_config

    return grpo_config(model_dir, out_dir, steps, G, prompts, length, report_to="none", disable_tqdm=True,
                       old_logps_from_training_forward=in_loss)


def run_one(cfg, ignore_eos: bool) -> dict:
    from posttrain.grpo.run import build_trainer

    trainer = build_trainer(cfg)
    trainer.rollout_ignore_eos = ignore_eos
    try:
        trainer.train()
    finally:
        trainer.engine.close()
    logs = [h for h in trainer.state.log_history if "timing/step" in h][1:]
    out = {k: statistics.median(h[k] for h in logs) for k in KEYS if logs and k in logs[0]}
    out["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="make the demo's SFT checkpoint (init, distill, SFT: ~2.5 min)")
    p.add_argument("--sft", default=None, help="an SFT checkpoint for the demo's GRPO stage")
    p.add_argument("--presets", nargs="+", default=None)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # as the demo's test runs it; one core's work either way
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        setups: dict[str, tuple] = {}
        if args.demo or args.sft:
            sft = args.sft
            if sft is None:
                from eval_hooks.chain import run_chain

                run_chain(ROOT / "recipes" / "tiny-arith.yaml", str(Path(tmp) / "demo"), only=["init", "distill", "sft"])
                sft = str(Path(tmp) / "demo" / "sft")
            setups["demo-grpo"] = (lambda out, in_loss, sft=sft: demo_grpo_config(sft, out, args.steps, in_loss), False)
        for preset in args.presets or []:
            from posttrain.model_init import init_model

            model_dir = str(init_model(preset, Path(tmp) / preset, seed=0))
            setups[preset] = (lambda out, in_loss, m=model_dir: preset_grpo_config(
                m, out, args.steps, in_loss, args.G, args.prompts, args.length), True)
        for name, (make_cfg, ignore_eos) in setups.items():
            runs: dict[str, list[dict]] = {"separate": [], "in_loss": []}
            for r in range(args.repeats):
                for label, in_loss in (("separate", False), ("in_loss", True)):
                    t0 = time.time()
                    res = run_one(make_cfg(str(Path(tmp) / f"{name}-{label}-{r}"), in_loss), ignore_eos)
                    res["wall_s"] = time.time() - t0
                    runs[label].append(res)
                    print(f"{name} {label:8s} repeat {r}: " + "  ".join(
                        f"{k.split('/')[-1]}={res[k]:.3f}s" for k in KEYS if k in res), flush=True)
            row = {label: {k: statistics.median(x[k] for x in rs) for k in KEYS if k in rs[0]}
                   for label, rs in runs.items()}
            # Without dynamic sampling both score the same padded rows, so TRL's old log-probs equal the training
            # forward's bit for bit; dynamic sampling re-pads the kept groups, which moves them by float rounding.
            row["max_loss_rel_diff"] = max(abs(a - b) / max(abs(a), 1e-12) for x, y in zip(runs["separate"], runs["in_loss"])
                                           for a, b in zip(x["losses"], y["losses"]))
            row["step_ratio"] = row["in_loss"]["timing/step"] / row["separate"]["timing/step"]
            row["training_ratio"] = row["in_loss"]["timing/training"] / row["separate"]["timing/training"]
            results[name] = row
            print(f"{name}: step {row['separate']['timing/step']:.3f} -> {row['in_loss']['timing/step']:.3f} s "
                  f"({row['step_ratio']:.3f}x), training {row['separate']['timing/training']:.3f} -> "
                  f"{row['in_loss']['timing/training']:.3f} s ({row['training_ratio']:.3f}x); "
                  f"losses differ by {row['max_loss_rel_diff']:.1e} relative at most", flush=True)
    results["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch_threads": 1, "steps": args.steps, "repeats": args.repeats}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
