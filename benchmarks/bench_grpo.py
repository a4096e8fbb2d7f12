"""GRPO step time: vLLM engine vs transformers `generate`, same configuration, one process.

For each preset (tiny, and `small`, a larger model that still fits a CPU) the same GRPO run
(model, G, prompts, completion length, seed) is timed with the colocated vLLM engine and with the
transformers fallback engine; per-step time is the median over the measured steps (the first
step, which includes engine warm-up, is dropped), split into generation / scoring / training /
sync as the trainer logs them.

    python benchmarks/bench_grpo.py [--presets tiny small] [--steps 6] [--json out.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

KEYS = ("timing/step", "timing/generation", "timing/scoring", "timing/training", "timing/sync_weights")


def grpo_config(model_dir: str, out_dir: str, steps: int, G: int, prompts: int, length: int, **overrides):
    """The benchmarked run: G x `prompts` completions per step (of exactly `length` tokens with the trainer's
    `rollout_ignore_eos`), math_accuracy, fp32; `overrides` set other GRPORecipeConfig fields."""
    from posttrain.grpo.config import GRPORecipeConfig

    return GRPORecipeConfig(
        output_dir=out_dir, model_name_or_path=model_dir, max_steps=steps, per_device_train_batch_size=G * prompts,
        num_generations=G, max_completion_length=length, learning_rate=1e-5, save_strategy="no", seed=0,
        vllm_max_model_length=512, max_prompts=256, **overrides,
    )


def run_one(model_dir: str, engine_kind: str, steps: int, out_dir: str, G: int, prompts: int, length: int) -> dict:
    from posttrain.grpo.run import build_trainer

    trainer = build_trainer(grpo_config(model_dir, out_dir, steps, G, prompts, length, use_vllm=(engine_kind == "vllm")))
    trainer.rollout_ignore_eos = True  # both engines generate exactly `length` tokens per completion
    trainer.train()
    trainer.engine.close()
    logs = [h for h in trainer.state.log_history if "timing/step" in h][1:]  # drop warm-up step
    return {k: statistics.median(h[k] for h in logs) for k in KEYS if logs and k in logs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from posttrain.model_init import init_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            model_dir = str(init_model(preset, Path(tmp) / preset, seed=0))
            for kind in ("vllm", "hf"):
                t0 = time.time()
                r = run_one(model_dir, kind, args.steps, str(Path(tmp) / f"{preset}-{kind}"), args.G, args.prompts, args.length)
                r["wall_s"] = round(time.time() - t0, 1)
                results[f"{preset}/{kind}"] = r
                print(f"{preset:6s} {kind:5s} " + "  ".join(f"{k.split('/')[-1]}={v:.3f}s" for k, v in r.items() if k in KEYS), flush=True)
            v, h = results[f"{preset}/vllm"], results[f"{preset}/hf"]
            results[f"{preset}/speedup"] = h["timing/step"] / v["timing/step"]
            results[f"{preset}/sync_fraction"] = v["timing/sync_weights"] / v["timing/step"]
            print(f"{preset}: vLLM steps {results[f'{preset}/speedup']:.2f}x faster than transformers generate; "
                  f"sync = {100 * results[f'{preset}/sync_fraction']:.1f}% of the vLLM step")
    results["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "G": args.G, "prompts_per_step": args.prompts, "completion_tokens": args.length,
                          "measured_steps": args.steps - 1}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
