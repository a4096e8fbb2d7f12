"""Rule-based math verifier (DeepSeek-V3 report §5.2.1, "Rule-Based RM").

The report rewards math only when the model gives its final answer "in a designated
format (e.g., within a box)" so that rules can check it. Here: the final answer is the last
``\\boxed{...}`` after ``</think>``, compared with the gold ``answer`` column by math-verify
in a process pool with a hard per-item timeout (see :mod:`rewards.procpool`).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from .procpool import get_pool
from .text import completion_text, split_think

logger = logging.getLogger(__name__)

__all__ = [
    "extract_final_answer",
    "verify_math",
    "verify_math_batch",
    "gold_answer_text",
    "math_accuracy",
    "make_math_accuracy",
    "MathAccuracy",
    "ANSWER_FORMATS",
]

DEFAULT_TIMEOUT_S = 5.0
_WORKER_TARGET = "rewards._math_worker:verify_pair"

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# The rest of the line is taken greedily and stripped in Python: a lazy ``(.+?)\s*$`` retries the
# trailing whitespace at every character of the line (quadratic in long runs of spaces).
_ANSWER_LINE = re.compile(r"(?im)^.*?\b(?:final answer|answer)\s*(?:is|:)\s*(.+)$")


def _balanced_from(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == "{"``; None if never closed.
    Escaped braces (``\\{``, ``\\}``: literal set braces) do not count."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    # The last box is the final answer; if it is unclosed the output was cut off.
    return _balanced_from(text, matches[-1].end() - 1)


def _answer_tag(text: str) -> str | None:
    found = _ANSWER_TAG.findall(text)
    return found[-1] if found else None


def _answer_line(text: str) -> str | None:
    found = _ANSWER_LINE.findall(text)
    if not found:
        return None
    # Markdown bold around the answer ("The answer is **5**.") is not part of it.
    return found[-1].strip().strip("*").strip().rstrip(".").strip("$* ")


ANSWER_FORMATS: dict[str, Callable[[str], str | None]] = {
    "boxed": _last_boxed,  # \boxed{...} / \fbox{...}, balanced braces
    "answer_tag": _answer_tag,  # <answer>...</answer>
    "answer_line": _answer_line,  # "... answer is X" / "Answer: X"
}


def extract_final_answer(text: str, formats: Sequence[str] = ("boxed",)) -> str | None:
    """Return the final answer of a completion, or None if it gave none.

    Only the part after the last ``</think>`` is searched; a ``<think>`` that was never
    closed means no answer (None). ``formats`` are tried in order (keys of
    :data:`ANSWER_FORMATS`); the default is the last ``\\boxed{...}``.
    """
    _, answer_part, well_formed = split_think(text)
    if not well_formed:
        return None
    for name in formats:
        try:
            extractor = ANSWER_FORMATS[name]
        except KeyError:
            raise ValueError(f"unknown answer format {name!r}; known: {sorted(ANSWER_FORMATS)}") from None
        found = extractor(answer_part)
        if found is not None and found.strip():
            return found.strip()
    return None


def gold_answer_text(gold: Any) -> str | None:
    """The gold answer as text for math-verify; None if there is none (None, blank, NaN).

    A numeric column gives Python/numpy floats: ``str(1e-05)`` is ``'1e-05'``, which math-verify
    reads as ``1*e - 5`` (Euler's e), so they are written out in plain decimals; a NaN is a
    missing value (pandas / datasets), not the answer ``n*a*n``."""
    if gold is None or (isinstance(gold, str) and not gold.strip()):
        return None
    if isinstance(gold, numbers.Real) and not isinstance(gold, numbers.Integral):
        if math.isnan(gold):
            return None
        text = str(gold)
        if math.isfinite(gold) and "e" in text.lower():
            text = format(Decimal(text), "f")
        return text
    return str(gold)


def _verify_statuses(
    preds: Sequence[str | None], golds: Sequence[str], timeout_s: float | None, workers: int | None
) -> list[str]:
    """One status per pair: correct / wrong / gold_unparseable / timeout / error."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold answers")
    statuses = ["wrong"] * len(preds)
    gold_texts = [gold_answer_text(g) for g in golds]
    for i, g in enumerate(gold_texts):
        if g is None:
            statuses[i] = "gold_unparseable"
    # Rows without an answer still go to the pool: an unparseable gold makes them None too.
    todo = [i for i in range(len(preds)) if statuses[i] == "wrong"]
    items = [(preds[i], gold_texts[i]) for i in todo]
    if timeout_s is None:  # in-process, no deadline: only for trusted inputs
        from ._math_worker import verify_pair

        for i, item in zip(todo, items):
            statuses[i] = verify_pair(item)
        return statuses
    for i, out in zip(todo, get_pool(_WORKER_TARGET, workers).map(items, timeout_s)):
        if out.status == "ok":
            statuses[i] = out.value
        else:
            logger.warning("math verification of item %d: %s (%s)", i, out.status, out.error)
            statuses[i] = "timeout" if out.status == "timeout" else "error"
    return statuses


def verify_math_batch(
    preds: Sequence[str | None],
    golds: Sequence[str],
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
) -> list[bool | None]:
    """Check extracted answers against gold answers in the process pool.

    ``preds`` are final answers as :func:`extract_final_answer` returns them (None = no
    answer, which is False). Returns True/False per pair, or None where it could not be
    decided: the item timed out (its worker was killed), the worker crashed, or the gold
    answer does not parse. ``timeout_s=None`` runs in this process without a deadline.
    """
    mapping = {"correct": True, "wrong": False}
    return [mapping.get(s) for s in _verify_statuses(preds, golds, timeout_s, workers)]


def verify_math(pred_text: str | None, gold: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """True if the extracted answer ``pred_text`` equals ``gold`` mathematically.

    Undecidable cases (timeout, unparseable gold) count as False. Runs in the pool with a
    hard timeout; ``timeout_s=None`` runs in-process (trusted inputs only).
    """
    return verify_math_batch([pred_text], [gold], timeout_s)[0] is True


class MathAccuracy:
    """The ``math_accuracy`` reward with its settings (a class, not a closure, so it pickles).

    Reward per completion: 1.0 if the final answer verifies against the gold column, 0.0 if
    it is wrong, missing, inside an unclosed ``<think>``, or its check timed out; None when
    the gold answer itself does not parse (the row is skipped, as TRL's accuracy_reward does).
    """

    __name__ = "math_accuracy"

    def __init__(
        self,
        formats: Sequence[str] = ("boxed",),
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        gold_column: str = "answer",
        workers: int | None = None,
    ) -> None:
        for name in formats:
            if name not in ANSWER_FORMATS:
                raise ValueError(f"unknown answer format {name!r}; known: {sorted(ANSWER_FORMATS)}")
        if timeout_s is not None and not timeout_s > 0:  # 0 or less timed out every check: every answer 0.0
            raise ValueError(f"timeout_s must be > 0 seconds (or None: no deadline, trusted inputs only), got {timeout_s}")
        self.formats = tuple(formats)
        self.timeout_s = timeout_s
        self.gold_column = gold_column
        self.workers = workers

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        golds = kwargs.get(self.gold_column)
        if golds is None and self.gold_column == "answer":
            golds = kwargs.get("solution")  # TRL's accuracy_reward column name
        if golds is None:
            raise ValueError(
                f"math_accuracy needs a gold-answer column {self.gold_column!r}; got columns {sorted(kwargs)}"
            )
        preds = [extract_final_answer(completion_text(c), self.formats) for c in completions]
        statuses = _verify_statuses(preds, golds, self.timeout_s, self.workers)
        log_extra = kwargs.get("log_extra")
        if callable(log_extra):
            log_extra("extracted_answer", [p if p is not None else "[none]" for p in preds])
        return [None if s == "gold_unparseable" else float(s == "correct") for s in statuses]


def make_math_accuracy(
    formats: Sequence[str] = ("boxed",),
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    gold_column: str = "answer",
    workers: int | None = None,
) -> MathAccuracy:
    """A ``math_accuracy`` reward with other answer formats, timeout or gold column."""
    return MathAccuracy(formats, timeout_s, gold_column, workers)


_default_math_accuracy = MathAccuracy()


def math_accuracy(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 if the last ``\\boxed{}`` after ``</think>`` equals the gold ``answer``, else 0.0.

    None if the gold answer does not parse. See :class:`MathAccuracy`."""
    if answer is not None:
        kwargs["answer"] = answer
    return _default_math_accuracy(prompts, completions, **kwargs)
