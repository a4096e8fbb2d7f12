"""Word n-gram decontamination: drop training prompts that share an n-gram (default 8
words, after lower-casing and stripping punctuation) with an evaluation set's prompts.
A prompt shorter than n words is compared whole."""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from .errors import DataError

_WORD = re.compile(r"\w+", re.UNICODE)
TEXT_COLUMNS = ("prompt", "problem", "question", "messages", "text")


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


class Decontaminator:
    def __init__(self, eval_texts: Iterable[str], n: int = 8):
        if n < 1:
            raise DataError(f"ngram must be >= 1, got {n}")
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        for t in eval_texts:
            self.grams |= ngrams(t, n)

    def contaminated(self, text: str) -> bool:
        return not self.grams.isdisjoint(ngrams(text, self.n))


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
