"""Format and language rewards on the think/answer layout of reasoning completions."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from .text import THINK_CLOSE, THINK_OPEN, completion_text, split_think

__all__ = ["FormatReward", "make_format_reward", "format_reward", "LanguageConsistency",
           "make_language_consistency", "language_consistency", "script_of"]


class FormatReward:
    """1.0 if the completion is ``<think>reasoning</think>answer`` with a non-empty answer.

    Exactly one think block, opening at the start (after whitespace). With
    ``require_open_tag=False`` the opening tag may be missing, for chat templates (like R1's)
    that put ``<think>`` in the prompt. With ``require_boxed=True`` the answer must contain
    ``\\boxed{``.
    """

    __name__ = "format"

    def __init__(self, require_boxed: bool = False, require_open_tag: bool = True) -> None:
        self.require_boxed = require_boxed
        self.require_open_tag = require_open_tag

    def score(self, text: str) -> float:
        body = text.lstrip()
        if body.count(THINK_CLOSE) != 1 or body.count(THINK_OPEN) > 1:
            return 0.0
        if body.startswith(THINK_OPEN):
            pass
        elif self.require_open_tag or THINK_OPEN in body:
            return 0.0
        _, answer, _ = split_think(body)
        if not answer.strip():
            return 0.0
        if self.require_boxed and "\\boxed{" not in answer:
            return 0.0
        return 1.0

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [self.score(completion_text(c)) for c in completions]


def make_format_reward(require_boxed: bool = False, require_open_tag: bool = True) -> FormatReward:
    """A ``format`` reward with options (see :class:`FormatReward`)."""
    return FormatReward(require_boxed, require_open_tag)


_format = FormatReward()


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 for ``<think>…</think>`` followed by a non-empty answer, else 0.0."""
    return _format(prompts, completions, **kwargs)


# -- language consistency ----------------------------------------------------------------
# Scripts are read from Unicode character names ("LATIN SMALL LETTER A", "CJK UNIFIED
# IDEOGRAPH-4E2D", ...). Ideographs and kana are written without spaces, so each character
# counts as one word; other scripts count maximal runs of letters.
_PER_CHAR_SCRIPTS = {"CJK", "HIRAGANA", "KATAKANA"}
_ALIASES = {
    "en": {"LATIN"}, "latin": {"LATIN"}, "ascii": {"LATIN"},
    "zh": {"CJK"}, "cjk": {"CJK", "HIRAGANA", "KATAKANA", "HANGUL"},
    "ja": {"CJK", "HIRAGANA", "KATAKANA"}, "ko": {"HANGUL", "CJK"},
    "ru": {"CYRILLIC"}, "cyrillic": {"CYRILLIC"}, "el": {"GREEK"}, "greek": {"GREEK"},
    "ar": {"ARABIC"}, "arabic": {"ARABIC"},
}
_LATEX_CMD = re.compile(r"\\[A-Za-z]+")


def script_of(ch: str) -> str | None:
    """The script of a letter (``"LATIN"``, ``"CJK"``, ``"CYRILLIC"``, …); None for non-letters."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else None


def _word_scripts(text: str) -> Iterable[str | None]:
    current: str | None = None
    for ch in text:
        script = script_of(ch)
        if script in _PER_CHAR_SCRIPTS:
            current = None
            yield script
        elif script is None:
            current = None
        elif script != current:
            current = script
            yield script


class LanguageConsistency:
    """Share of the reasoning's words written in the target script (DeepSeek-R1 §2.3.3: "the
    proportion of target language words in the CoT").

    Words are runs of letters of one script (each CJK ideograph or kana counts as one word);
    digits, punctuation and LaTeX commands (``\\frac``) are ignored. Returns None when there
    is no reasoning block or it has no words (nothing to judge).
    """

    __name__ = "language_consistency"

    def __init__(self, target: str | Iterable[str] = "en") -> None:
        if isinstance(target, str):
            scripts = _ALIASES.get(target.lower(), {target.upper()})
        else:
            scripts = {s.upper() for s in target}
        self.scripts = frozenset(scripts)

    def score(self, text: str) -> float | None:
        reasoning, _, _ = split_think(text)
        if reasoning is None:
            return None
        words = list(_word_scripts(_LATEX_CMD.sub(" ", reasoning)))
        if not words:
            return None
        return sum(w in self.scripts for w in words) / len(words)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return [self.score(completion_text(c)) for c in completions]


def make_language_consistency(target: str | Iterable[str] = "en") -> LanguageConsistency:
    """A language-consistency reward for ``target``: a language code (``en``, ``zh``, ``ja``,
    ``ko``, ``ru``, …), a script name (``latin``, ``cjk``, ``cyrillic``) or a set of Unicode
    script prefixes."""
    return LanguageConsistency(target)


_lang_en = LanguageConsistency("en")


def language_consistency(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """Fraction of words in the ``<think>`` block written in Latin script (English)."""
    return _lang_en(prompts, completions, **kwargs)
