"""Throughput of the reward verifiers: process pool / parallel sandboxes vs a serial loop.

    python benchmarks/bench_rewards.py [--repeats 5] [--math-items 120] [--code-completions 16]

math: ``verify_math_batch`` (pool of one worker per core, hard per-item timeout) against a
loop calling the same per-item check in this process. code: ``code_tests`` (sandbox runs in
parallel, bounded by cores) against a loop of ``run_python`` calls. Each repeat uses fresh
cases (so no cache warmed by an earlier repeat helps either side), and within a repeat both
sides get the same cases. The table shows medians over the repeats.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards  # noqa: E402
from rewards._math_worker import verify_pair  # noqa: E402
from rewards.code_reward import extract_code, outputs_match  # noqa: E402
from rewards.procpool import default_workers  # noqa: E402
from rewards.sandbox import SandboxLimits, run_python  # noqa: E402


def math_cases(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    preds, golds = [], []
    for i in range(n):
        a, b, c = rng.randint(2, 97), rng.randint(2, 97), rng.randint(2, 97)
        kind = i % 4
        if kind == 0:
            preds.append(rf"\frac{{{a * b}}}{{{b * c}}}")
            golds.append(rf"\frac{{{a}}}{{{c}}}")
        elif kind == 1:
            preds.append(f"(x+{a})^2")
            golds.append(f"x^2+{2 * a}x+{a * a}")
        elif kind == 2:
            preds.append(rf"\{{{a}, {b}, {c}\}}")
            golds.append(rf"\{{{c}, {a}, {b}\}}")
        else:
            preds.append(rf"\sqrt{{{a * a * b}}}")
            golds.append(rf"{a}\sqrt{{{b}}}")
    return preds, golds


PROGRAM = "```python\nn = int(input())\nprint(sum(i * i for i in range({k})) % (n + 1))\n```"


def code_cases(rng: random.Random, n: int, tests_per: int) -> tuple[list[str], list[list[dict[str, str]]]]:
    completions, tests = [], []
    for _ in range(n):
        k = rng.randint(20_000, 40_000)
        completions.append(PROGRAM.format(k=k))
        row = []
        for _ in range(tests_per):
            m = rng.randint(1, 1000)
            row.append({"input": f"{m}\n", "output": f"{sum(i * i for i in range(k)) % (m + 1)}\n"})
        tests.append(row)
    return completions, tests


def bench_math(repeats: int, n: int, timeout_s: float) -> tuple[list[float], list[float]]:
    verify_pair(("1", "1"))  # warm sympy in this process
    rewards.verify_math_batch(["1"], ["1"], timeout_s=timeout_s)  # start the pool
    serial, pool = [], []
    for r in range(repeats):
        preds, golds = math_cases(random.Random(1000 + r), n)
        t0 = time.perf_counter()
        s_out = [verify_pair((p, g)) == "correct" for p, g in zip(preds, golds)]
        serial.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        p_out = rewards.verify_math_batch(preds, golds, timeout_s=timeout_s)
        pool.append(n / (time.perf_counter() - t0))
        assert p_out == s_out and all(s_out), "pool and serial disagree"
    return serial, pool


def bench_code(repeats: int, n: int, tests_per: int) -> tuple[list[float], list[float]]:
    limits = SandboxLimits(timeout_s=10)
    reward = rewards.make_code_tests(limits=limits)
    serial, pool = [], []
    for r in range(repeats):
        completions, tests = code_cases(random.Random(2000 + r), n, tests_per)
        runs = n * tests_per
        t0 = time.perf_counter()
        s_out = []
        for comp, row in zip(completions, tests):
            code = extract_code(comp)
            passed = [outputs_match(run_python(code, case["input"], limits).stdout, case["output"]) for case in row]
            s_out.append(sum(passed) / len(row))
        serial.append(runs / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        p_out = reward(["q"] * n, completions, tests=tests)
        pool.append(runs / (time.perf_counter() - t0))
        assert p_out == s_out == [1.0] * n, (s_out, p_out)
    return serial, pool


def _burn(n: int) -> float:
    s = 0
    for i in range(n):
        s += i
    return float(s)


def parallel_ceiling(workers: int, n: int = 5_000_000) -> float:
    """Throughput of ``workers`` CPU-bound processes relative to one, measured now: on a
    machine shared with other jobs this is the most any parallel speed-up can reach."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_burn, [1000] * workers)  # start-up out of the timing
        t0 = time.perf_counter()
        pool.map(_burn, [n])
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool.map(_burn, [n] * workers, chunksize=1)
        many = time.perf_counter() - t0
    return workers * one / many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--math-items", type=int, default=120)
    ap.add_argument("--code-completions", type=int, default=16)
    ap.add_argument("--tests-per-completion", type=int, default=3)
    args = ap.parse_args()
    print(f"cores usable: {default_workers()}, load average before: {os.getloadavg()}")
    rows = [
        ("math_accuracy (verify)", "items", *bench_math(args.repeats, args.math_items, timeout_s=10.0)),
        ("code_tests (sandbox)", "runs", *bench_code(args.repeats, args.code_completions, args.tests_per_completion)),
    ]
    ceiling = statistics.median(parallel_ceiling(default_workers()) for _ in range(3))
    print(f"load average after: {os.getloadavg()}")
    print(f"parallel ceiling now ({default_workers()} busy-loop processes vs 1): {ceiling:.2f}x")
    print(f"\n| reward | unit | serial {'/s':>5} | pool {'/s':>5} | ratio |")
    print("|---|---|---:|---:|---:|")
    for name, unit, serial, pool in rows:
        s, p = statistics.median(serial), statistics.median(pool)
        print(f"| {name} | {unit} | {s:.1f} | {p:.1f} | {p / s:.2f}x |")
    print(f"\nmedian of {args.repeats} repeats; math: {args.math_items} items/repeat; code: "
          f"{args.code_completions} completions x {args.tests_per_completion} tests/repeat")


if __name__ == "__main__":
    main()
