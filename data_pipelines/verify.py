"""Answer verification for rejection sampling, through the ``rewards`` package (the same
verifiers GRPO scores with, so "kept" here means "would earn reward" there)."""

from __future__ import annotations

from typing import Any, Sequence

CORRECT = "correct"


def verify_math_answers(responses: Sequence[str], golds: Sequence[Any], timeout_s: float) -> list[str]:
    """Per response: ``correct``, ``no_answer`` (no boxed final answer after ``</think>``),
    ``wrong_answer``, or ``unverifiable`` (verifier timed out, or the gold is missing (None) or
    does not parse)."""
    from rewards import extract_final_answer, verify_math_batch

    preds = [extract_final_answer(r) for r in responses]
    # verify_math_batch reads each gold as rewards.gold_answer_text does (None stays unverifiable)
    results = verify_math_batch(preds, list(golds), timeout_s=timeout_s)
    out = []
    for pred, ok in zip(preds, results):
        if pred is None:
            out.append("no_answer")
        elif ok is None:
            out.append("unverifiable")
        else:
            out.append(CORRECT if ok else "wrong_answer")
    return out


def verify_code_tests(responses: Sequence[str], tests: Sequence[Any], timeout_s: float) -> list[str]:
    """Per response: ``correct`` (its last ```python block passes every test case in the
    sandbox), ``no_code``, ``tests_failed`` or ``unverifiable`` (no test cases: ``[]``, None or
    ``""``). Malformed test cases raise :class:`DataError`."""
    from rewards import extract_code, make_code_tests
    from rewards.errors import RowFailure

    from .errors import DataError

    reward = make_code_tests(mode="all", timeout_s=timeout_s)
    try:
        scores = reward([None] * len(responses), list(responses), tests=list(tests))
    except (ValueError, TypeError) as e:
        raise DataError(f"tests column: {e}") from None
    bad = next((s for s in scores if isinstance(s, RowFailure)), None)
    if bad is not None:
        raise DataError(f"tests column: {bad.cause}")
    out = []
    for r, s in zip(responses, scores):
        if extract_code(r) is None:
            out.append("no_code")
        elif s is None:
            out.append("unverifiable")
        else:
            out.append(CORRECT if s == 1.0 else "tests_failed")
    return out
