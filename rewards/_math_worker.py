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


def _bare(text: str) -> str:
    """``text`` without math delimiters, surrounding space and a sentence-final period."""
    text = text.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left) : len(text) - len(right)].strip()
            break
    return text[:-1].rstrip() if text.endswith(".") else text


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str) -> list:
    """Parse a gold answer. Bare answers are wrapped in ``\\boxed{}`` so LaTeX such as
    ``2\\pi`` or ``2, 3`` is read whole (a plain parse picks out the first number).

    A sentence-final period is punctuation (``12.``, ``2\\pi.``, ``(1, 2).``): the answer is
    first read without it, since ``\\boxed{12.}`` parses to the bare string ``'12.'`` and
    ``\\boxed{(1, 2).}`` to ``2``. A parse that yields only strings (no sympy object) is not
    trusted while another form is left; last, the text is parsed unwrapped, as math-verify
    itself would (``parse("$12.$")`` -> ``[12, '12.']``), but only if what it read is the whole
    answer (``parse("0.\\overline{3}")`` reads just ``0``). If no form gives a sympy object the
    first non-empty result is used (strings are still compared as strings)."""
    if "\\boxed" in gold:
        tries = [(gold, False)]
    else:
        stripped = gold.rstrip()
        tries = []
        if stripped.endswith(".") and stripped[:-1].strip():
            tries.append(("\\boxed{" + stripped[:-1].rstrip() + "}", False))
        tries += [("\\boxed{" + gold + "}", False), (gold, True)]
    first: list = []
    for text, must_be_whole in tries:
        parsed = parse(text, parsing_timeout=None)
        if any(not isinstance(p, str) for p in parsed):
            if not must_be_whole or any(isinstance(p, str) and _bare(p) == _bare(gold) for p in parsed):
                return parsed
            continue  # a plain parse that picked a number out of a longer answer
        first = first or parsed
    return first


def parse_pred(pred: str) -> list:
    """Parse an extracted final answer (the inside of ``\\boxed{}``).

    As for the gold (:func:`parse_gold`), a sentence-final period is punctuation: ``\\boxed{12.}``
    parses to the bare string ``'12.'``, so the answer is first read without it."""
    stripped = pred.rstrip()
    if stripped.endswith(".") and stripped[:-1].strip():
        parsed = parse("\\boxed{" + stripped[:-1].rstrip() + "}", parsing_timeout=None)
        if any(not isinstance(p, str) for p in parsed):
            return parsed
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
