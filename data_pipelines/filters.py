"""Rule-based response filters for rejection sampling (DeepSeek-V3 report §5.1: R1
outputs suffer from overthinking, poor formatting and excessive length; R1's report adds
language mixing, long paragraphs and code blocks as reasons to filter CoT).

Each check returns a rejection reason or None; :func:`first_failure` runs them in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN = "<think>"
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class FilterConfig:
    min_length: int = 1
    max_length: int | None = None
    language_mixing_threshold: float = 0.05
    repetition_ngram: int = 4
    repetition_threshold: float = 0.5
    repetition_min_ngrams: int = 20


def split_response(text: str) -> tuple[str | None, str]:
    """``(chain_of_thought, answer_part)``; the CoT is None when there is no closed think
    block.  A response may omit the opening tag (R1's chat template emits it in the prompt).
    Same splitting as the rewards package, so "kept" agrees with what GRPO would score."""
    from rewards.text import split_think

    reasoning, answer, well_formed = split_think(text)
    if not well_formed or reasoning is None:
        return None, answer
    return reasoning.strip(), answer.strip()


# Scripts an English CoT writes in: Latin (accents included: "Schrödinger"), and the Greek letters and
# mathematical alphanumerics of its formulas (π, θ, 𝑥), which are notation, not another language.
_COT_SCRIPTS = {"LATIN", "GREEK", "MATHEMATICAL"}


def foreign_script_letter_fraction(text: str) -> float:
    """Share of letters in scripts other than Latin, Greek and the mathematical alphanumerics: a signal
    of language mixing in an English CoT (a share of non-ASCII letters counted π and ö as mixing)."""
    from rewards.format_reward import script_of

    scripts = [script_of(c) for c in text if c.isalpha()]
    if not scripts:
        return 0.0
    return sum(s not in _COT_SCRIPTS for s in scripts) / len(scripts)


def repeated_ngram_fraction(text: str, n: int = 4) -> tuple[float, int]:
    """``(1 - distinct/total, total)`` over word n-grams: near 1 for degenerate loops."""
    words = _WORD.findall(text.lower())
    total = len(words) - n + 1
    if total <= 0:
        return 0.0, 0
    grams = {tuple(words[i:i + n]) for i in range(total)}
    return 1.0 - len(grams) / total, total


def _one_think_block(text: str) -> bool:
    """Exactly one think block, opening at the start when the opening tag is there (R1's template may put it
    in the prompt), as GRPO's `format` reward requires: two blocks, a stray closing tag before the block
    or a block reopened after it is a garbled response, whatever its final answer."""
    from rewards.format_reward import FormatReward

    return FormatReward(require_open_tag=False).score(text) > 0 or not split_response(text)[1].strip()


def response_length(text: str, tokens: int | None) -> int:
    """Length in tokens when the teacher counted them, else in characters."""
    return tokens if tokens is not None else len(text)


def first_failure(text: str, tokens: int | None, finish_reason: str | None, cfg: FilterConfig) -> str | None:
    cot, _ = split_response(text)
    length = response_length(text, tokens)
    if finish_reason == "length" or (cfg.max_length is not None and length > cfg.max_length):
        return "too_long"
    if cot is None:
        return "unclosed_think" if THINK_OPEN in text else "no_think"
    if not _one_think_block(text):
        return "malformed_think"
    if length < cfg.min_length:
        return "too_short"
    if foreign_script_letter_fraction(cot) > cfg.language_mixing_threshold:
        return "language_mixing"
    frac, total = repeated_ngram_fraction(cot, cfg.repetition_ngram)
    if total >= cfg.repetition_min_ngrams and frac > cfg.repetition_threshold:
        return "repetition"
    return None
