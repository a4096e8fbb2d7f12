"""Runs inside a pool worker process: parse and compare one (prediction, gold) pair.

math-verify's own timeouts use ``signal.alarm`` (main thread only, and useless while sympy
sits in C code), so they are switched off here; the pool enforces a hard deadline by
killing this process from outside.
"""

from __future__ import annotations

import functools
import logging

from math_verify import parse, verify

# With timeouts off math-verify warns once per process; the pool handles timeouts.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str) -> list:
    """Parse a gold answer. Bare answers are wrapped in ``\\boxed{}`` so LaTeX such as
    ``2\\pi`` or ``2, 3`` is read whole (a plain parse picks out the first number)."""
    tries = [gold] if "\\boxed" in gold else ["\\boxed{" + gold + "}", gold]
    for text in tries:
        parsed = parse(text, parsing_timeout=None)
        if parsed:
            return parsed
    return []


def parse_pred(pred: str) -> list:
    """Parse an extracted final answer (the inside of ``\\boxed{}``)."""
    return parse("\\boxed{" + pred + "}", parsing_timeout=None)


def verify_pair(item: tuple[str | None, str]) -> str:
    """``"correct"``, ``"wrong"`` or ``"gold_unparseable"`` for one ``(pred, gold)`` pair
    (``pred`` None: no answer was given, which is wrong unless the gold does not parse).

    Gold is parsed first and ``verify(gold, pred)`` keeps math-verify's argument order
    (it is asymmetric: e.g. a gold interval vs a predicted inequality).
    """
    pred, gold = item
    gold_parsed = parse_gold(gold)
    if not gold_parsed:
        return "gold_unparseable"
    if pred is None:  # no final answer given
        return "wrong"
    pred_parsed = parse_pred(pred)
    if not pred_parsed:
        return "wrong"
    return "correct" if verify(gold_parsed, pred_parsed, timeout_seconds=None) else "wrong"
