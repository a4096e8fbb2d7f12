"""DAPO's soft overlong punishment (Yu et al. 2025, §3.4, Eq. 13).

    R(y) = 0                          if |y| <= L_max - L_cache
         = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
         = -1                         if |y| > L_max
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .text import completion_text

__all__ = ["SoftOverlong", "make_soft_overlong", "soft_overlong"]


class SoftOverlong:
    """Length penalty: ``|y|`` is ``len(completion_ids[i])`` when the trainer passes token ids,
    else a fallback count of the text (``"words"``: whitespace-separated, ``"chars"``)."""

    __name__ = "soft_overlong"

    def __init__(self, max_len: int = 4096, cache: int = 1024, fallback: str = "words") -> None:
        if not 0 <= cache <= max_len:
            raise ValueError(f"need 0 <= cache <= max_len, got cache={cache}, max_len={max_len}")
        if fallback not in ("words", "chars"):
            raise ValueError(f"fallback must be 'words' or 'chars', got {fallback!r}")
        self.max_len, self.cache, self.fallback = max_len, cache, fallback

    def penalty(self, length: int) -> float:
        soft_start = self.max_len - self.cache
        if length <= soft_start:
            return 0.0
        if length <= self.max_len:
            return (soft_start - length) / self.cache
        return -1.0

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float]:
        if completion_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
        else:
            texts = [completion_text(c) for c in completions]
            lengths = [len(t.split()) if self.fallback == "words" else len(t) for t in texts]
        return [self.penalty(n) for n in lengths]


def make_soft_overlong(max_len: int = 4096, cache: int = 1024, fallback: str = "words") -> SoftOverlong:
    """A soft overlong punishment with ``L_max = max_len`` and ``L_cache = cache``."""
    return SoftOverlong(max_len, cache, fallback)


_default = SoftOverlong()


def soft_overlong(prompts: Sequence[Any], completions: Sequence[Any],
                  completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float]:
    """DAPO soft overlong punishment (L_max=4096, L_cache=1024): 0, then linear to -1 at L_max.

    Other limits: ``soft_overlong(max_len=..., cache=...)`` as a spec, or :func:`make_soft_overlong`."""
    return _default(prompts, completions, completion_ids=completion_ids, **kwargs)
