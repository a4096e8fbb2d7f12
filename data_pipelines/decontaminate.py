"""Word n-gram decontamination: drop training prompts that share an n-gram (default 8
words, after lower-casing and stripping punctuation) with an evaluation set's prompts.

A text shorter than n words has no n-gram, so it is matched by containment instead: an
eval text of m < n words contaminates a training prompt whose words contain its m words
contiguously, and a training prompt of m < n words is contaminated when its words occur
contiguously in an eval text.  Containment needs at least ``MIN_SHORT_WORDS`` (3) words;
a 1-2 word text ("Compute 5") is too common to count and only matches an identical text."""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from .errors import DataError

_WORD = re.compile(r"\w+", re.UNICODE)
TEXT_COLUMNS = ("prompt", "problem", "question", "messages", "text")
MIN_SHORT_WORDS = 3  # shortest text (in words) matched by containment rather than identity


def prompt_text(value: Any) -> str:
    """The user-visible text of a prompt (a string or chat messages; system turns ignored)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(str(m.get("content", "")) for m in value
                         if isinstance(m, dict) and m.get("role") not in ("system", "assistant"))
    return ""


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Decontaminator:
    """``contaminated(text)``: ``text`` shares an n-gram with an eval text, or (for texts
    shorter than n words, at least ``MIN_SHORT_WORDS`` long) one contains the other's
    words contiguously, or the two are identical after normalisation."""

    def __init__(self, eval_texts: Iterable[str], n: int = 8):
        if n < 1:
            raise DataError(f"ngram must be >= 1, got {n}")
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: dict[int, set[tuple[str, ...]]] = {}  # short eval texts by word count
        self._eval_words: list[list[str]] = []  # for k-grams of short training prompts
        self._kgrams: dict[int, set[tuple[str, ...]]] = {}  # built lazily per k
        for t in eval_texts:
            words = _words(t)
            if not words:
                continue
            self._eval_words.append(words)
            if len(words) >= n:
                self.grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            else:  # identical short texts always match; contained ones from MIN_SHORT_WORDS
                self.short.setdefault(len(words), set()).add(tuple(words))

    def _eval_kgrams(self, k: int) -> set[tuple[str, ...]]:
        if k not in self._kgrams:
            self._kgrams[k] = {tuple(w[i:i + k]) for w in self._eval_words
                               for i in range(len(w) - k + 1)}
        return self._kgrams[k]

    def contaminated(self, text: str) -> bool:
        words = _words(text)
        if not words:
            return False
        L, n = len(words), self.n
        if L >= n and not self.grams.isdisjoint(tuple(words[i:i + n]) for i in range(L - n + 1)):
            return True
        if L < n:
            if tuple(words) in self.short.get(L, ()):
                return True
            if L >= MIN_SHORT_WORDS and tuple(words) in self._eval_kgrams(L):
                return True
        for m, texts in self.short.items():  # a short eval text inside this prompt
            if MIN_SHORT_WORDS <= m < L and not texts.isdisjoint(
                    tuple(words[i:i + m]) for i in range(L - m + 1)):
                return True
        return False


def load_eval_texts(names: Sequence[str], prompt_column: str | None = None) -> list[str]:
    """Prompt texts of the named evaluation sets (``builtin:arith:test``, a file, a Hub id;
    ``name@split`` picks a split, default ``test``)."""
    from .loading import load_rows

    texts: list[str] = []
    for name in names:
        split = "test"
        if "@" in name:
            name, split = name.rsplit("@", 1)
        ds = load_rows(name, split)
        col = next((c for c in ([prompt_column] if prompt_column else []) + list(TEXT_COLUMNS)
                    if c in ds.column_names), None)
        if col is None:
            raise DataError(f"decontaminate_against {name}: no prompt column; looked for "
                            f"{[prompt_column, *TEXT_COLUMNS] if prompt_column else list(TEXT_COLUMNS)}, "
                            f"columns are: {ds.column_names}")
        texts.extend(prompt_text(v) for v in ds[col])
    return texts
