"""Does GRPO raise held-out accuracy over its SFT starting point? (issue #6; measured, not asserted)

From an SFT checkpoint (e.g. `runs/tiny-arith/sft` after `make demo`), run GRPO with the
math_accuracy reward on the built-in `digits` level and print greedy accuracy on held-out
test-split problems before, every `--every` steps (eval_hooks.EvalCallback through the same vLLM
engine) and after, plus the training reward and MTP acceptance. The runs and their outcomes so far
are in benchmarks/RESULTS.md ("GRPO learning").

    python benchmarks/grpo_learning.py runs/tiny-arith/sft --steps 100 --lr 3e-5 \
        [--batch 128] [--G 8] [--gamma 1e-3] [--mtp 0.3|auto] [--max-prompts N] [--problems 500] \
        [--task "builtin:arith?level=digits&max_operand=4"] [--eval-task TASK] \
        [--dynamic-sampling] [--max-rounds 3] [--loss-type grpo|dapo|dr_grpo] [--temperature 1.0]

Held-out accuracy is printed with its 95% Wilson interval, and the change with a paired 95%
interval over the same problems (eval_hooks.report).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--batch", type=int, default=128, help="completions per step")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--gamma", type=float, default=1e-3, help="bias_update_speed")
    ap.add_argument("--mtp", default="0.3", help="mtp_loss_weight (a number or auto)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-prompts", type=int, default=None, help="train on only the first N prompts")
    ap.add_argument("--problems", type=int, default=500, help="held-out test-split problems")
    ap.add_argument("--task", default="builtin:arith?level=digits",
                    help="training prompts; the held-out problems are the test split of the same task")
    ap.add_argument("--eval-task", default=None, help="held-out problems from this task's test split (default: --task)")
    ap.add_argument("--dynamic-sampling", action="store_true", help="DAPO dynamic sampling (drop tied groups, top up)")
    ap.add_argument("--max-rounds", type=int, default=3, help="max_sampling_rounds with --dynamic-sampling")
    ap.add_argument("--loss-type", default="grpo")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="runs/grpo-learning")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from engines.vllm_engine import VLLMColocateEngine
    from eval_hooks.accuracy import evaluate_accuracy
    from eval_hooks.benchmarks import load_benchmark
    from eval_hooks.callback import EvalCallback
    from eval_hooks.report import paired_difference, wilson_interval
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import build_trainer
    from posttrain.layout import weights_for_engine

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    eval_task = args.eval_task or args.task
    sep = "&" if "?" in eval_task else "?"
    prompts, answers = load_benchmark(f"{eval_task}{sep}n_test={args.problems}", "test", args.problems)
    engine = VLLMColocateEngine(args.checkpoint, max_model_len=512)
    try:
        before_res = evaluate_accuracy(engine, tok, prompts, answers, max_tokens=48)
        before = before_res["accuracy"]
        cfg = GRPORecipeConfig(
            output_dir=args.output_dir, model_name_or_path=args.checkpoint, dataset_name=args.task,
            max_prompts=args.max_prompts, max_steps=args.steps, per_device_train_batch_size=args.batch,
            num_generations=args.G, max_completion_length=48, learning_rate=args.lr, lr_scheduler_type="constant",
            beta=args.beta, bias_update_speed=args.gamma, mtp_loss_weight=args.mtp, temperature=args.temperature,
            dynamic_sampling=args.dynamic_sampling, max_sampling_rounds=args.max_rounds, loss_type=args.loss_type,
            save_strategy="no", seed=args.seed, logging_steps=1, disable_tqdm=True,
        )
        trainer = build_trainer(cfg, engine=engine)
        evals = EvalCallback(prompts, answers, args.every, max_tokens=48).attach(trainer)
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
        engine.sync_weights(weights_for_engine(trainer.model, engine))
        after_res = evaluate_accuracy(engine, tok, prompts, answers, max_tokens=48)
        after = after_res["accuracy"]
    finally:
        engine.close()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [h["reward"] for h in logs]
    k = min(10, len(rewards))
    print(f"GRPO {args.steps} steps in {seconds:.0f} s: held-out greedy accuracy ({args.problems} problems) "
          f"{before:.3f} -> {after:.3f}")
    n = len(prompts)
    lo0, hi0 = wilson_interval(round(before * n), n)
    lo1, hi1 = wilson_interval(round(after * n), n)
    d = paired_difference(before_res["correct"], after_res["correct"])
    print(f"  before {before:.3f} [{lo0:.3f}, {hi0:.3f}], after {after:.3f} [{lo1:.3f}, {hi1:.3f}] (Wilson 95%); "
          f"after - before {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (paired 95%; "
          f"{d['only_after_right']} only after, {d['only_before_right']} only before)")
    print("during:", [(h["step"], round(h["eval/accuracy"], 3)) for h in evals.history])
    print(f"training reward: first {k} steps {sum(rewards[:k]) / k:.3f}, last {k} {sum(rewards[-k:]) / k:.3f}")
    if args.dynamic_sampling:
        dropped = [h.get("sampling/groups_dropped", 0.0) for h in logs]
        rounds = [h.get("sampling/rounds", 1.0) for h in logs]
        extra = sum(h.get("timing/extra_generation", 0.0) for h in logs)
        print(f"dynamic sampling: {sum(dropped) / len(dropped):.2f} groups dropped and {sum(rounds) / len(rounds):.2f} "
              f"engine calls per step; extra generation {extra:.1f} s; trained-batch frac_reward_zero_std max "
              f"{max(h.get('frac_reward_zero_std', 0.0) for h in logs):.3f}")
    lam = [h["mtp_loss_weight"] for h in logs if "mtp_loss_weight" in h]
    if lam:
        print(f"mtp_loss_weight: first {lam[0]:.3f}, last {lam[-1]:.3f}, min {min(lam):.3f}, max {max(lam):.3f}")
    acc = [h["mtp/accept_rate"] for h in logs if "mtp/accept_rate" in h]
    if acc:
        print(f"mtp/accept_rate: first {k} steps {sum(acc[:k]) / k:.3f}, last {k} {sum(acc[-k:]) / k:.3f}")


if __name__ == "__main__":
    main()
