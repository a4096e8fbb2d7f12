"""Rule-based code reward (DeepSeek-V3 report §5.2.1: "for LeetCode problems, a compiler
can be utilized to generate feedback based on test cases").

The program is the completion's last fenced Python block (after ``</think>``); it runs in
:mod:`rewards.sandbox` once per stdin/stdout test case, completions and cases in parallel
(bounded by cores; the work itself happens in the sandboxed child processes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .errors import RowFailure
from .procpool import default_workers
from .sandbox import SandboxLimits, run_python
from .text import completion_text, split_think

logger = logging.getLogger(__name__)

__all__ = ["extract_code", "parse_tests", "outputs_match", "CodeTests", "make_code_tests", "code_tests",
           "code_tests_all"]

_FENCE = re.compile(r"```[ \t]*(python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The last fenced ```python block of the answer part (after ``</think>``); None if absent
    or if a ``<think>`` block was never closed."""
    _, answer, well_formed = split_think(text)
    if not well_formed:
        return None
    blocks = _FENCE.findall(answer)
    return blocks[-1][1] if blocks else None


def parse_tests(tests: Any) -> list[dict[str, str]]:
    """Normalise one row's test cases to ``[{"input": str, "output": str}, ...]``.

    Accepts that list, a JSON string of it, or the APPS/TACO form
    ``{"inputs": [...], "outputs": [...]}`` (also as JSON; call-based rows, with ``fn_name``, are
    refused). A missing value (None, an empty or
    blank string, JSON ``null``) means no test cases: ``[]``. Raises ValueError for a malformed
    value.
    """
    if tests is None:
        return []
    if isinstance(tests, (str, bytes)):
        if not tests.strip():
            return []
        try:
            tests = json.loads(tests)
        except ValueError as exc:
            raise ValueError(f"tests are not valid JSON: {exc}") from None
        if tests is None:
            return []
    if isinstance(tests, dict) and "inputs" in tests:
        if tests.get("fn_name"):  # APPS/TACO call-based: arguments of a function, not stdin
            raise ValueError(f"call-based tests (fn_name={tests['fn_name']!r}) are not supported: "
                             "code_tests runs stdin/stdout tests only")
        if "outputs" not in tests:
            raise ValueError("tests have 'inputs' but no 'outputs'")
        try:
            tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"], strict=True)]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tests 'inputs'/'outputs' do not pair up: {exc}") from None
    if not isinstance(tests, (list, tuple)):
        raise ValueError(f"tests must be a list of {{'input','output'}} dicts, got {type(tests).__name__}")
    out = []
    for case in tests:
        if not isinstance(case, dict) or "input" not in case or "output" not in case:
            raise ValueError(f"each test case needs 'input' and 'output', got {case!r:.80}")
        out.append({"input": _as_text(case["input"]), "output": _as_text(case["output"])})
    return out


def _as_text(value: Any) -> str:
    # APPS/TACO give some stdin inputs and expected outputs as lists of lines; their harness joins
    # them with newlines (str() would expect the text "['3']" and fail every program).
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    return str(value)


def _normalise(text: str) -> str:
    lines = text.replace("\r\n", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip("\n")


def outputs_match(actual: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""
    return _normalise(actual) == _normalise(expected)


class CodeTests:
    """The ``code_tests`` reward with its settings (a class, so it pickles).

    ``mode="fraction"``: the fraction of test cases passed; ``mode="all"``: 1.0 only if all
    pass (remaining cases are skipped after the first failure). No code block → 0.0; a row
    with no test cases (``[]``, None, ``""``) → None (nothing to check); a row whose test cases
    are malformed → :class:`~rewards.errors.RowFailure` (a NaN naming the problem: the scoring
    policy decides, and the other rows are scored as usual).
    """

    def __init__(self, mode: str = "fraction", limits: SandboxLimits | None = None,
                 workers: int | None = None, tests_column: str = "tests") -> None:
        if mode not in ("fraction", "all"):
            raise ValueError(f"mode must be 'fraction' or 'all', got {mode!r}")
        self.mode = mode
        self.limits = limits or SandboxLimits()
        self.workers = workers
        self.tests_column = tests_column
        self.__name__ = "code_tests" if mode == "fraction" else "code_tests_all"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        if self.tests_column not in kwargs:
            raise ValueError(f"{self.__name__} needs a {self.tests_column!r} column; got columns {sorted(kwargs)}")
        tests_col = list(kwargs[self.tests_column])
        programs = [extract_code(completion_text(c)) for c in completions]
        if len(tests_col) != len(programs):
            raise ValueError(f"{len(programs)} completions but {len(tests_col)} rows of tests")
        cases: list[list[dict[str, str]]] = []
        bad: dict[int, str] = {}  # row -> why its tests cannot be used
        for i, t in enumerate(tests_col):
            try:
                cases.append(parse_tests(t))
            except Exception as exc:  # one malformed row must not fail the others
                cases.append([])
                bad[i] = f"malformed {self.tests_column!r} value: {exc}"
                logger.warning("%s: row %d: %s", self.__name__, i, bad[i])
        passed = [[False] * len(c) for c in cases]
        failed = [False] * len(programs)  # for mode="all": stop after the first failure
        lock = threading.Lock()

        def run(i: int, j: int) -> None:
            if self.mode == "all" and failed[i]:
                return
            case = cases[i][j]
            res = run_python(programs[i], case["input"], self.limits)  # type: ignore[arg-type]
            ok = res.ok and outputs_match(res.stdout, case["output"])
            with lock:
                passed[i][j] = ok
                failed[i] = failed[i] or not ok

        jobs = [(i, j) for i, p in enumerate(programs) if p is not None for j in range(len(cases[i]))]
        with ThreadPoolExecutor(max_workers=self.workers or default_workers()) as pool:
            for fut in [pool.submit(run, i, j) for i, j in jobs]:
                fut.result()
        rewards: list[float | None] = []
        for i, (prog, row_cases, row_passed) in enumerate(zip(programs, cases, passed)):
            if i in bad:
                rewards.append(RowFailure(bad[i]))
            elif not row_cases:
                rewards.append(None)
            elif prog is None:
                rewards.append(0.0)
            elif self.mode == "all":
                rewards.append(float(all(row_passed)))
            else:
                rewards.append(sum(row_passed) / len(row_cases))
        return rewards


def make_code_tests(mode: str = "fraction", limits: SandboxLimits | None = None, workers: int | None = None,
                    tests_column: str = "tests", timeout_s: float | None = None) -> CodeTests:
    """A ``code_tests`` reward: ``mode`` ``"fraction"`` or ``"all"``; ``timeout_s`` per test case
    (shorthand for ``limits=SandboxLimits(timeout_s=...)``)."""
    if timeout_s is not None:
        limits = dataclasses.replace(limits or SandboxLimits(), timeout_s=timeout_s)
    return CodeTests(mode, limits, workers, tests_column)


_fraction = CodeTests("fraction")
_all = CodeTests("all")


def code_tests(prompts: Sequence[Any], completions: Sequence[Any], tests: Sequence[Any], **kwargs: Any
               ) -> list[float | None]:
    """Fraction of the row's stdin/stdout ``tests`` passed by the last ```python block.

    The program runs in the sandbox once per test case (see :class:`CodeTests`)."""
    return _fraction(prompts, completions, tests=tests, **kwargs)


def code_tests_all(prompts: Sequence[Any], completions: Sequence[Any], tests: Sequence[Any], **kwargs: Any
                   ) -> list[float | None]:
    """1.0 if the completion's program passes every test case of its row, else 0.0."""
    return _all(prompts, completions, tests=tests, **kwargs)
