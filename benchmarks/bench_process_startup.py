"""What a fresh training process pays before its first step: two start-up costs, before and after session 24.

    python benchmarks/bench_process_startup.py [--repeats 5]

Each run is a fresh interpreter (one torch thread), as a user's `dsv3-posttrain sft` / `grpo` process or a restart
after a kill is; the two variants alternate, so both see the same load. Medians, and ours / before:

- `sft-trainer`: importing the SFT trainer and applying the training patches. Before, the patches also patched TRL's
  GRPO module (`apply_training_patches()` then imported `trl.trainer.grpo_trainer`, and TRL imports vLLM there);
  now only the GRPO trainer asks for that (`apply_training_patches(grpo=True)`).
- `first-logprobs`: a colocated vLLM engine's first generation that asks for log-probs (GRPO's rollouts do), on the
  tiny model. Before, vLLM's sampler compiled its log-prob rank count with inductor the first time, in every fresh
  engine process; now `engines.compat.count_at_least_cpu` counts eagerly on CPU (VLLM_CPU_LOGPROB_RANKS).
  The engine is built first, untimed; the timed call is the first `generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SFT_TRAINER = """
import json, sys, time
t = time.perf_counter()
import posttrain.sft.trainer
from engines import compat
compat.apply_training_patches(grpo=sys.argv[1] == "before")
print(json.dumps({"seconds": time.perf_counter() - t, "vllm imported": "vllm" in sys.modules}))
"""

FIRST_LOGPROBS = """
import json, os, sys, time
from engines.types import SamplingSettings
from engines.vllm_engine import VLLMColocateEngine
engine = VLLMColocateEngine(sys.argv[2], max_model_len=256)
if sys.argv[1] == "before":  # vLLM's own, compiled count in place of ours
    import vllm.v1.sample.ops.logprobs as ops
    import vllm.v1.sample.sampler as sampler
    sampler.batched_count_greater_than = ops.batched_count_greater_than
t = time.perf_counter()
out = engine.generate([[5, 6, 7, 8]], 8, SamplingSettings(temperature=1.0, max_tokens=16, seed=0))
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "tokens": sum(len(c.token_ids) for c in out[0])}), flush=True)
os._exit(0)
"""


def _run(code: str, *argv: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1",
           # the repository first, the parent's entries kept (a GPU machine carries its stack on PYTHONPATH)
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"child {argv} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from posttrain.model_init import init_model

    model = str(init_model("tiny", Path(tempfile.mkdtemp()) / "tiny", seed=0))
    cases = {"sft-trainer": (SFT_TRAINER, ()), "first-logprobs": (FIRST_LOGPROBS, (model,))}
    for name, (code, extra) in cases.items():
        times: dict[str, list[float]] = {"before": [], "ours": []}
        seen = {}
        for _ in range(args.repeats):
            for variant in times:
                got = _run(code, variant, *extra)
                times[variant].append(got.pop("seconds"))
                seen.setdefault(variant, got)
        before, ours = statistics.median(times["before"]), statistics.median(times["ours"])
        print(f"{name}: before {before:.2f} s, ours {ours:.2f} s, ours/before {ours / before:.3f} "
              f"(medians of {args.repeats}; runs: {json.dumps(times)}; {json.dumps(seen)})")


if __name__ == "__main__":
    main()
