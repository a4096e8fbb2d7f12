"""Sampled evaluation on the colocated vLLM engine: what asking for log-probs and detokenizing cost.

    python benchmarks/bench_eval_sampling.py [--model DIR] [--prompts 200] [--n 8] [--max-tokens 48] [--repeats 3]

The evaluation scores answers from their token ids; vLLM by default also detokenizes every sampled token (the
text, and each log-prob's token string) and the engine asked for the sampled tokens' log-probs. This runs the
same seeded requests (T 0.6, top-p 0.95, the eval stage's sampling) three ways on one engine, the calls
alternating so that all see the same load, and prints each one's median time and its ratio to the first:

- `logprobs+detokenize`: the engine's requests before session 23;
- `logprobs`: GRPO's rollouts now (`detokenize=False`; the importance-sampling correction needs the log-probs);
- `bare`: evaluation now (`SamplingSettings(logprobs=False)`).

It also checks that the three give the same token ids. The default model is the tiny random checkpoint, whose
answers run to `--max-tokens` (the demo's initial checkpoint in its eval stage)."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"logprobs+detokenize": (0, True), "logprobs": (0, False), "bare": (None, False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the tiny random model, written to a temp dir)")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from vllm import SamplingParams, TokensPrompt

    from engines.types import prompt_seed
    from engines.vllm_engine import make_llm

    model = args.model
    if model is None:
        from posttrain.model_init import init_model

        model = str(init_model("tiny", Path(tempfile.mkdtemp()) / "tiny", seed=0))
    llm = make_llm(model, max_model_len=256)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(20)] for _ in range(args.prompts)]

    def run(logprobs, detokenize):
        params = [SamplingParams(n=args.n, temperature=0.6, top_p=0.95, max_tokens=args.max_tokens,
                                 seed=prompt_seed(1, p), logprobs=logprobs, detokenize=detokenize) for p in prompts]
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t, [list(c.token_ids) for o in outs for c in o.outputs]

    run(*VARIANTS["bare"])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, (logprobs, detokenize) in VARIANTS.items():
            dt, toks = run(logprobs, detokenize)
            times[name].append(dt)
            tokens[name] = toks
    base = statistics.median(times["logprobs+detokenize"])
    report = {
        "samples": args.prompts * args.n, "tokens": sum(map(len, tokens["bare"])),
        "same_tokens": all(t == tokens["bare"] for t in tokens.values()),
        **{name: {"median_s": round(statistics.median(ts), 2), "times_s": [round(x, 2) for x in ts],
                  "vs_logprobs+detokenize": round(statistics.median(ts) / base, 3)} for name, ts in times.items()},
    }
    print(json.dumps(report, indent=2))
    if not report["same_tokens"]:
        sys.exit("the variants sampled different tokens")


if __name__ == "__main__":
    main()
