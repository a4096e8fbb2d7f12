"""Rejection-sampling verdicts (data_pipelines.verify) on rows the rewards cannot score."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_pipelines.errors import DataError  # noqa: E402
from data_pipelines.verify import verify_code_tests, verify_math_answers  # noqa: E402


def test_missing_gold_is_unverifiable_not_wrong():
    # str(None) made the gold the answer "None": every sample was rejected as "wrong_answer".
    responses = [r"<think>x</think>\boxed{5}", r"<think>x</think>\boxed{5}", r"<think>x</think>\boxed{5}", "no box"]
    assert verify_math_answers(responses, [None, "5", 4, None], timeout_s=10) == [
        "unverifiable", "correct", "wrong_answer", "no_answer"]
    assert verify_math_answers([r"<think>x</think>\boxed{None}"], [None], timeout_s=10) == ["unverifiable"]


GOOD = "<think>p</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
TESTS = [{"input": "1 2\n", "output": "3\n"}]


def test_code_rows_without_tests_are_unverifiable():
    assert verify_code_tests([GOOD] * 4, [TESTS, None, "", []], timeout_s=5) == [
        "correct", "unverifiable", "unverifiable", "unverifiable"]


def test_malformed_code_tests_are_a_data_error():
    with pytest.raises(DataError, match=r"tests column: malformed 'tests' value: tests are not valid JSON"):
        verify_code_tests([GOOD] * 2, [TESTS, "{oops"], timeout_s=5)
