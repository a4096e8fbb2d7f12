"""MTP-speculative rollouts: rollout tokens/s and GRPO step time with k = 0, 1, 2 draft tokens, one process.

On the `small` preset (4 layers + 1 MTP module, hidden 256, 16 routed experts), completions of exactly
`--length` tokens (`ignore_eos`), G completions for each of `--prompts` built-in arithmetic prompts per
step, temperature 1, fp32, the colocated vLLM engine (CPU build). For each drafter and each k, one engine:

- rollout tokens/s: one warm-up call, then `--reps` timed calls of the GRPO rollout shape (G x prompts
  completions), each on its own window of `--prompts` consecutive prompts of the train split (the
  warm-up on rows 0-3, the timed calls on rows 4-7, 8-11, ... for 4 prompts; the GRPO steps below draw
  from its first 256 rows); the median, with vLLM's own draft acceptance
  over the timed calls. Acceptance depends strongly on the prompts: per 4-prompt window it ranged from
  3% to 74% for the same trained drafter, so one fixed window is not a measurement of the drafter;
- GRPO step time: `--steps` GRPO steps through that engine (`rollout_speculative_tokens: k`, weight sync
  incl. the drafter every step); the median of all steps but the first, with its split and the logged
  `rollout/spec_accept_rate` and `mtp/accept_rate`.

Ratios are against k = 0 on the same drafter. Two drafters, same model otherwise:

- `random-mtp`: the checkpoint as `init-model` writes it, except that lm_head is scaled by `--sharpen`
  (a random model's next-token distribution is nearly uniform over the 1,024-token vocabulary, so at
  temperature 1 no drafter could be accepted more than ~0.1% of the time; scaled, its top-1 probability
  is about that of a trained policy). Its MTP module is random: drafts are almost never accepted, i.e.
  the cost of speculating for nothing.
- `trained-mtp`: the same checkpoint after `--mtp-steps` Adam steps on the MTP module alone, teacher-forced
  on the policy's own temperature-1 samples of other prompts of the same task: a drafter as good as the
  policy's sampling noise allows.

With `--window-scan [ROW ...]`, instead of the above: the trained drafter's acceptance on each window of
prompts (how much it depends on the prompts).

With `--ceiling`, the best case as well: greedy rollouts of the benchmark's prompts by a drafter trained on
exactly those outputs (nearly every draft accepted); rollout tokens/s only.

    python benchmarks/bench_spec_rollouts.py [--ks 0 1 2] [--length 128] [--reps 5] [--steps 5] [--ceiling]
                                             [--drafters random-mtp trained-mtp] [--window-scan [ROW ...]]
                                             [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STEP_KEYS = ("timing/step", "timing/generation", "timing/scoring", "timing/training", "timing/sync_weights")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def task_prompt_ids(model_dir: str, skip: int, count: int, seed: int = 0) -> list[list[int]]:
    """Chat-templated built-in arithmetic prompts, as GRPO tokenizes them."""
    from transformers import AutoTokenizer

    from data_pipelines.loading import load_rows

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = load_rows("builtin:arith", "train")
    out = []
    for i in range(skip, skip + count):
        prompt = rows[i]["prompt"]
        if isinstance(prompt, list):
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        out.append(list(ids))
    return out


def make_checkpoints(root: Path, preset: str, sharpen: float, mtp_steps: int, length: int) -> tuple[str, str, dict]:
    """(random-MTP dir, trained-MTP dir, facts about the training)."""
    import torch
    from transformers import AutoTokenizer

    from engines.types import SamplingSettings
    from engines.vllm_engine import VLLMColocateEngine
    from posttrain.model_init import init_model
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    init_dir = init_model(preset, root / "init", seed=0)
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(init_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    random_dir = root / "random-mtp"
    model.save_pretrained(random_dir)
    AutoTokenizer.from_pretrained(init_dir).save_pretrained(random_dir)

    # the policy's own temperature-1 samples of prompts the benchmark does not use (rows 1000+)
    prompts = task_prompt_ids(str(random_dir), skip=1000, count=16)
    engine = VLLMColocateEngine(str(random_dir), max_model_len=512, seed=0)
    try:
        outs = engine.generate(prompts, 4, SamplingSettings(temperature=1.0, max_tokens=length, seed=1, ignore_eos=True))
    finally:
        engine.close()
    seqs = [p + c.token_ids for p, group in zip(prompts, outs) for c in group]
    t0 = time.perf_counter()
    losses = train_mtp_only(model, seqs, mtp_steps)
    trained_dir = root / "trained-mtp"
    model.save_pretrained(trained_dir)
    AutoTokenizer.from_pretrained(init_dir).save_pretrained(trained_dir)
    return str(random_dir), str(trained_dir), {
        "mtp_train_sequences": len(seqs), "mtp_steps": mtp_steps, "mtp_loss_first_last": [losses[0], losses[-1]],
        "mtp_train_s": round(time.perf_counter() - t0, 1), "sharpen": sharpen}


def train_mtp_only(model, seqs: list[list[int]], steps: int) -> list[float]:
    """Adam on the MTP module alone, teacher-forced on `seqs` (right-padded): the MTP losses."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    n_main = model.config.num_hidden_layers
    params = [p for name, p in model.named_parameters() if name.startswith(f"model.layers.{n_main}.")]
    opt = torch.optim.Adam(params, lr=3e-3)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    losses = []
    for _ in range(steps):
        _, loss = model._mtp(hidden, ids, None, labels, mask, detach_input=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def greedy_ceiling(root: Path, random_dir: str, prompt_ids: list[list[int]], ks: list[int], G: int, length: int,
                   reps: int, mtp_steps: int) -> dict:
    """The best case for speculation: greedy rollouts of the benchmark's own prompts, with an MTP module trained
    on exactly those greedy outputs (nearly every draft is accepted). Rollout tokens/s per k, no GRPO."""
    import torch
    from transformers import AutoTokenizer

    from engines.types import SamplingSettings
    from engines.vllm_engine import VLLMColocateEngine
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    engine = VLLMColocateEngine(random_dir, max_model_len=512, seed=0)
    try:
        outs = engine.generate(prompt_ids, 1, SamplingSettings(temperature=0.0, max_tokens=length, ignore_eos=True))
    finally:
        engine.close()
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(random_dir, dtype=torch.float32)
    train_mtp_only(model, [p + g[0].token_ids for p, g in zip(prompt_ids, outs)], mtp_steps)
    ceiling_dir = root / "greedy-ceiling"
    model.save_pretrained(ceiling_dir)
    AutoTokenizer.from_pretrained(random_dir).save_pretrained(ceiling_dir)
    results = {}
    for k in ks:
        engine = VLLMColocateEngine(str(ceiling_dir), max_model_len=512, seed=0, speculative_tokens=k)
        try:
            results[f"k={k}"] = rollout_rate(engine, [prompt_ids], G, length, reps, temperature=0.0)
        finally:
            engine.close()
        r = results[f"k={k}"]
        print(f"greedy-ceiling k={k}: rollout {r['tokens_per_s']:.0f} tok/s {r['tokens_per_s_all']} "
              f"accept={r.get('spec_accept_rate')}", flush=True)
    if 0 in ks:
        for k in ks:
            results[f"k={k}"]["rollout_speedup"] = results[f"k={k}"]["tokens_per_s"] / results["k=0"]["tokens_per_s"]
    return results


def rollout_rate(engine, windows: list[list[list[int]]], G: int, length: int, reps: int,
                 temperature: float = 1.0) -> dict:
    """Warm-up on windows[0]; timed call r on windows[1 + r % (len - 1)] (on windows[0] when there is one)."""
    from engines.types import SamplingSettings

    def call(prompt_ids: list[list[int]], seed: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        outs = engine.generate(prompt_ids, G, SamplingSettings(temperature=temperature, max_tokens=length, seed=seed,
                                                               ignore_eos=True))
        dt = time.perf_counter() - t0
        assert all(len(c.token_ids) == length for group in outs for c in group)
        return dt, [lp for group in outs for c in group for lp in c.logprobs]

    call(windows[0], 0)  # warm-up
    timed = windows[1:] or windows
    before = engine.spec_decode_counts()
    times, logprobs = [], []
    for rep in range(reps):
        dt, lps = call(timed[rep % len(timed)], 100 + rep)
        times.append(dt)
        logprobs.extend(lps)
    after = engine.spec_decode_counts()
    tokens = len(timed[0]) * G * length
    r = {"tokens_per_s": tokens / statistics.median(times), "tokens_per_s_all": [round(tokens / t, 1) for t in times],
         "mean_sampled_logprob": statistics.fmean(logprobs)}
    if before is not None:
        drafted, accepted = after[0] - before[0], after[1] - before[1]
        r["spec_accept_rate"] = accepted / drafted if drafted else None
        r["draft_tokens"] = drafted
    return r


def window_scan(model_dir: str, rows: list[int], prompts: int, G: int, length: int) -> dict:
    """Draft acceptance (k = 1, T = 1, seed 100) on the rollouts of each window of `prompts` prompts from `rows`."""
    from engines.types import SamplingSettings
    from engines.vllm_engine import VLLMColocateEngine

    engine = VLLMColocateEngine(model_dir, max_model_len=512, seed=0, speculative_tokens=1)
    out = {}
    try:
        for row in rows:
            before = engine.spec_decode_counts()
            engine.generate(task_prompt_ids(model_dir, skip=row, count=prompts), G,
                            SamplingSettings(temperature=1.0, max_tokens=length, seed=100, ignore_eos=True))
            drafted, accepted = (a - b for a, b in zip(engine.spec_decode_counts(), before))
            out[f"rows {row}-{row + prompts - 1}"] = {"accepted": accepted, "drafted": drafted,
                                                      "rate": accepted / drafted if drafted else None}
            print(f"window rows {row}-{row + prompts - 1}: accepted {accepted}/{drafted}", flush=True)
    finally:
        engine.close()
    return out


def grpo_steps(engine, model_dir: str, k: int, steps: int, G: int, prompts: int, length: int, out_dir: str) -> dict:
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import build_trainer

    cfg = GRPORecipeConfig(
        output_dir=out_dir, model_name_or_path=model_dir, max_steps=steps, per_device_train_batch_size=G * prompts,
        num_generations=G, max_completion_length=length, learning_rate=1e-5, save_strategy="no", seed=0,
        max_prompts=256, rollout_speculative_tokens=k, vllm_max_model_length=512,
    )
    trainer = build_trainer(cfg, engine=engine)
    trainer.rollout_ignore_eos = True  # every k generates exactly `length` tokens per completion
    trainer.train()
    logs = [h for h in trainer.state.log_history if "timing/step" in h][1:]  # drop the warm-up step
    r = {key: statistics.median(h[key] for h in logs) for key in STEP_KEYS}
    r["step_s_all"] = [round(h["timing/step"], 3) for h in logs]
    for key in ("rollout/spec_accept_rate", "mtp/accept_rate"):
        vals = [h[key] for h in logs if key in h]
        r[key] = statistics.fmean(vals) if vals else None
    del trainer
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--drafters", nargs="+", default=["random-mtp", "trained-mtp"])
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sharpen", type=float, default=30.0)
    p.add_argument("--mtp-steps", type=int, default=60)
    p.add_argument("--ceiling", action="store_true",
                   help="also the best case: greedy rollouts with an MTP module trained on those very outputs")
    p.add_argument("--window-scan", nargs="*", type=int, default=None, metavar="ROW",
                   help="instead: the trained drafter's acceptance (k = 1) on the G x --prompts rollouts of each window "
                        "of --prompts prompts starting at these rows (acceptance depends strongly on the prompts)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    from engines.vllm_engine import VLLMColocateEngine

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    results: dict = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                 "loadavg_start": os.getloadavg()}}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        random_dir, trained_dir, facts = make_checkpoints(Path(tmp), args.preset, args.sharpen, args.mtp_steps,
                                                          args.length)
        results["setup"] = facts
        print("setup:", facts, flush=True)
        if args.window_scan is not None:
            results["window_scan"] = window_scan(trained_dir, args.window_scan or [0, 4, 8, 12, 16, 40, 100, 200, 1000,
                                                                                 1004, 1500], args.prompts, args.G,
                                                 args.length)
            args.drafters = []
        dirs = {"random-mtp": random_dir, "trained-mtp": trained_dir}
        windows = [task_prompt_ids(random_dir, skip=w * args.prompts, count=args.prompts) for w in range(args.reps + 1)]
        for drafter in args.drafters:
            for k in args.ks:
                t0 = time.time()
                engine = VLLMColocateEngine(dirs[drafter], max_model_len=512, seed=0, speculative_tokens=k)
                try:
                    roll = rollout_rate(engine, windows, args.G, args.length, args.reps)
                    step = grpo_steps(engine, dirs[drafter], k, args.steps, args.G, args.prompts, args.length,
                                      str(Path(tmp) / f"grpo-{drafter}-{k}"))
                finally:
                    engine.close()
                results[f"{drafter}/k={k}"] = {"rollout": roll, "grpo": step, "wall_s": round(time.time() - t0, 1)}
                print(f"{drafter} k={k}: rollout {roll['tokens_per_s']:.0f} tok/s {roll['tokens_per_s_all']} "
                      f"accept={roll.get('spec_accept_rate')} | step {step['timing/step']:.3f}s "
                      f"gen {step['timing/generation']:.3f}s train {step['timing/training']:.3f}s "
                      f"sync {step['timing/sync_weights']:.3f}s spec_accept={step['rollout/spec_accept_rate']} "
                      f"mtp_accept={step['mtp/accept_rate']}", flush=True)
            base = results[f"{drafter}/k=0"] if 0 in args.ks else None
            if base is None:
                continue
            for k in args.ks:
                r = results[f"{drafter}/k={k}"]
                r["rollout_speedup"] = r["rollout"]["tokens_per_s"] / base["rollout"]["tokens_per_s"]
                r["step_speedup"] = base["grpo"]["timing/step"] / r["grpo"]["timing/step"]
                print(f"{drafter} k={k}: rollout tokens/s x{r['rollout_speedup']:.2f}, GRPO step x{r['step_speedup']:.2f} "
                      "vs k=0", flush=True)
        if args.ceiling:
            results["greedy-ceiling"] = greedy_ceiling(Path(tmp), random_dir, windows[0], args.ks, args.G, args.length,
                                                       args.reps, args.mtp_steps)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["args"] = vars(args)
    results["wall_s"] = round(time.time() - t_start, 1)
    print(json.dumps(results["machine"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
