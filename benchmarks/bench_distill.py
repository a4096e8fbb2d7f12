"""Teacher throughput: the vLLM backend vs the transformers (`hf`) backend on the same tiny
V3 model and the same prompts, measured in one run.

    python benchmarks/bench_distill.py [--model DIR] [--prompts 8] [--n 4] [--max-tokens 32] [--repeats 3]

Times only ``Teacher.generate`` (engine/model start-up is reported separately); each figure
is the median of ``--repeats`` calls after one warm-up call, the two backends' calls
alternating so that both see the same load (the best repeat is
reported too: on a shared machine it is the least disturbed one).  The tiny model is random, so
samples usually run to ``--max-tokens``; tokens/s is printed next to samples/s.
Both run fp32 (bf16 is several times slower than fp32 on CPUs without bf16 instructions);
on CPU the vLLM teacher runs its engine in-process with the reference CPU_MLA backend and
PyTorch-native rotary embeddings (see data_pipelines/teachers/vllm_backend.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _summary(times, tokens, n_samples):
    t, best = statistics.median(times), min(times)
    return {"median_s": round(t, 4), "times_s": [round(x, 4) for x in times],
            "samples_per_s": round(n_samples / t, 2), "tokens_per_s": round(statistics.median(tokens) / t, 1),
            # on a shared machine the fastest repeat is the least disturbed one
            "best_samples_per_s": round(n_samples / best, 2)}


def _measure(teachers, prompts, n, sampling, repeats):
    """Repeats alternate between the teachers, so both see the same (shared-machine) load."""
    for t in teachers.values():
        t.generate(prompts, n, sampling)  # warm-up
    times = {k: [] for k in teachers}
    tokens = {k: [] for k in teachers}
    for _ in range(repeats):
        for k, teacher in teachers.items():
            t0 = time.perf_counter()
            out = teacher.generate(prompts, n, sampling)
            times[k].append(time.perf_counter() - t0)
            tokens[k].append(sum(c.completion_tokens or 0 for comps in out for c in comps))
            assert all(len(comps) == n for comps in out)
    return {k: _summary(times[k], tokens[k], len(prompts) * n) for k in teachers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="tiny model dir (default: written with posttrain.model_init)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both backends (vLLM's CPU engine uses 1 per worker)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    torch.set_num_threads(args.threads)

    from data_pipelines.arith_task import generate_split
    from data_pipelines.teachers.hf_backend import HFTeacher
    from data_pipelines.teachers.vllm_backend import VLLMTeacher
    from engines import SamplingSettings

    model = args.model
    if model is None:
        from posttrain.model_init import init_model

        model = str(init_model("tiny", Path(tempfile.mkdtemp(prefix="bench-tiny-"))))
    prompts = [r["prompt"] for r in generate_split("train", args.prompts, seed=123)]
    sampling = SamplingSettings(temperature=0.6, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    results = {"model": model, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
               "repeats": args.repeats, "machine": f"{platform.machine()} {os.cpu_count()} cores, "
               f"load avg at start {os.getloadavg()[0]:.2f}"}

    t0 = time.perf_counter()
    hf = HFTeacher(model, dtype="float32", batch_size=args.prompts * args.n)
    results["hf_start_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    vl = VLLMTeacher(model, dtype="float32", max_model_len=256,
                     llm_kwargs={"enforce_eager": True} if args.enforce_eager else None)
    results["vllm_start_s"] = round(time.perf_counter() - t0, 2)
    results.update(_measure({"hf": hf, "vllm": vl}, prompts, args.n, sampling, args.repeats))
    hf.close()
    vl.close()

    results["torch_threads"] = torch.get_num_threads()
    results["speedup_vllm_over_hf"] = round(results["vllm"]["samples_per_s"] / results["hf"]["samples_per_s"], 2)
    results["speedup_best_vs_best"] = round(results["vllm"]["best_samples_per_s"] / results["hf"]["best_samples_per_s"], 2)
    results["load_avg_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results, indent=2))
    print(f"vLLM {results['vllm']['samples_per_s']} samples/s vs hf {results['hf']['samples_per_s']} samples/s "
          f"-> {results['speedup_vllm_over_hf']}x (median); best vs best {results['speedup_best_vs_best']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":  # required: vLLM spawns its engine processes
    main()
