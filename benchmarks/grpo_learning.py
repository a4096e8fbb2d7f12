"""Does GRPO raise held-out accuracy over its SFT starting point? (issue #6 acceptance, open)

SFT the tiny model on the single-digit level (short reference solutions), then GRPO with
math_accuracy, and report greedy accuracy on 150 test-split problems before and after, with the
per-step rewards and MTP acceptance. Two runs so far gave 0.167 -> 0.247 and 0.247 -> 0.227: the
effect is within noise at this length, so it is measured here rather than asserted in a test.

    python benchmarks/grpo_learning.py SFT_STEPS GRPO_STEPS GRPO_LR     (e.g. 150 20 2e-5)
"""
import json
import sys
import time
from pathlib import Path
from data_pipelines.arith_task import generate_split
from posttrain.recipe import build_config
from posttrain.sft.config import SFTRecipeConfig
from posttrain.sft.run import run_sft
from posttrain.grpo.config import GRPORecipeConfig
from posttrain.grpo.run import build_trainer
from posttrain.rollout.engines import VLLMColocateEngine
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP
from eval_hooks.accuracy import evaluate_accuracy
from transformers import AutoTokenizer
from posttrain.model_init import init_model
if __name__ == "__main__":
    sft_steps, grpo_steps, grpo_lr = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    out = Path("runs/grpo-learning"); out.mkdir(parents=True, exist_ok=True); data = out / "sft.jsonl"
    with data.open("w") as f:
        for r in generate_split("train", 2000, seed=0, level="digits"):
            f.write(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["solution"]}]}) + "\n")
    sft_dir = out / f"sft{sft_steps}"
    if not (sft_dir / "model.safetensors").exists():
        cfg = build_config(SFTRecipeConfig, dict(model_name_or_path=str(init_model("tiny", Path("runs/grpo-learning/model-init"), seed=0)), dataset_name=str(data), output_dir=str(sft_dir),
            max_steps=sft_steps, learning_rate=3e-3, per_device_train_batch_size=8, max_length=128, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr": 3e-4}, warmup_steps=10, logging_steps=20, save_strategy="no", seed=0, bias_update_speed=0.01))
        t = time.time(); run_sft(cfg); print("SFT s", time.time() - t, flush=True)
    tok = AutoTokenizer.from_pretrained(sft_dir)
    test = generate_split("test", 150, seed=0, level="digits")
    P, A = [r["prompt"] for r in test], [r["answer"] for r in test]
    eng = VLLMColocateEngine(str(sft_dir), max_model_len=256)
    acc0 = evaluate_accuracy(eng, tok, P, A, max_tokens=32)["accuracy"]; print("SFT ACC", acc0, flush=True)
    cfg = GRPORecipeConfig(output_dir=str(out / "grpo"), model_name_or_path=str(sft_dir), dataset_name="builtin:arith?level=digits",
        max_steps=grpo_steps, per_device_train_batch_size=64, num_generations=8, max_completion_length=32, learning_rate=grpo_lr,
        lr_scheduler_type="constant", beta=0.001, save_strategy="no", seed=0, logging_steps=1)
    tr = build_trainer(cfg, engine=eng)
    t = time.time(); tr.train(); print("GRPO s", time.time() - t, flush=True)
    rw = [h["reward"] for h in tr.state.log_history if "reward" in h]; print("REWARDS", [round(x, 3) for x in rw])
    eng.sync_weights(tr.model)
    acc1 = evaluate_accuracy(eng, tok, P, A, max_tokens=32)["accuracy"]; print("GRPO ACC", acc1, flush=True)
    acc_mtp = [round(h["mtp/accept_rate"], 3) for h in tr.state.log_history if "mtp/accept_rate" in h]; print("MTP", acc_mtp)
