"""Does GRPO raise held-out accuracy over its SFT starting point? (issue #6; measured, not asserted)

From an SFT checkpoint (e.g. `runs/tiny-arith/sft` after `make demo`), run GRPO with the
math_accuracy reward on the built-in `digits` level and print greedy accuracy on held-out
test-split problems before, every `--every` steps (eval_hooks.EvalCallback through the same vLLM
engine) and after, plus the training reward and MTP acceptance. The runs and their outcomes so far
are in benchmarks/RESULTS.md ("GRPO learning").

    python benchmarks/grpo_learning.py runs/tiny-arith/sft --steps 100 --lr 3e-5 \
        [--batch 128] [--G 8] [--gamma 1e-3] [--mtp 0.3] [--max-prompts N] [--problems 500] \
        [--task "builtin:arith?level=digits&max_operand=4"]
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
    ap.add_argument("--mtp", type=float, default=0.3, help="mtp_loss_weight")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-prompts", type=int, default=None, help="train on only the first N prompts")
    ap.add_argument("--problems", type=int, default=500, help="held-out test-split problems")
    ap.add_argument("--task", default="builtin:arith?level=digits",
                    help="training prompts; the held-out problems are the test split of the same task")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="runs/grpo-learning")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from engines.vllm_engine import VLLMColocateEngine
    from eval_hooks.accuracy import evaluate_accuracy
    from eval_hooks.benchmarks import load_benchmark
    from eval_hooks.callback import EvalCallback
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import build_trainer
    from posttrain.layout import weights_for_engine

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    prompts, answers = load_benchmark(f"{args.task}&n_test={args.problems}", "test", args.problems)
    engine = VLLMColocateEngine(args.checkpoint, max_model_len=512)
    try:
        before = evaluate_accuracy(engine, tok, prompts, answers, max_tokens=48)["accuracy"]
        cfg = GRPORecipeConfig(
            output_dir=args.output_dir, model_name_or_path=args.checkpoint, dataset_name=args.task,
            max_prompts=args.max_prompts, max_steps=args.steps, per_device_train_batch_size=args.batch,
            num_generations=args.G, max_completion_length=48, learning_rate=args.lr, lr_scheduler_type="constant",
            beta=args.beta, bias_update_speed=args.gamma, mtp_loss_weight=args.mtp, temperature=args.temperature,
            save_strategy="no", seed=args.seed, logging_steps=1, disable_tqdm=True,
        )
        trainer = build_trainer(cfg, engine=engine)
        evals = EvalCallback(prompts, answers, args.every, max_tokens=48).attach(trainer)
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
        engine.sync_weights(weights_for_engine(trainer.model, engine))
        after = evaluate_accuracy(engine, tok, prompts, answers, max_tokens=48)["accuracy"]
    finally:
        engine.close()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [h["reward"] for h in logs]
    k = min(10, len(rewards))
    print(f"GRPO {args.steps} steps in {seconds:.0f} s: held-out greedy accuracy ({args.problems} problems) "
          f"{before:.3f} -> {after:.3f}")
    print("during:", [(h["step"], round(h["eval/accuracy"], 3)) for h in evals.history])
    print(f"training reward: first {k} steps {sum(rewards[:k]) / k:.3f}, last {k} {sum(rewards[-k:]) / k:.3f}")
    acc = [h["mtp/accept_rate"] for h in logs if "mtp/accept_rate" in h]
    if acc:
        print(f"mtp/accept_rate: first {k} steps {sum(acc[:k]) / k:.3f}, last {k} {sum(acc[-k:]) / k:.3f}")


if __name__ == "__main__":
    main()
