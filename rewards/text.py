"""Turning completions (plain or TRL conversational) into text, and splitting think blocks."""

from __future__ import annotations

from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def completion_text(completion: Any) -> str:
    """Return the text of one completion.

    Accepts a plain string, or TRL's conversational format: a list of
    ``{"role", "content"}`` messages (the assistant turns are joined; ``content`` may itself
    be a list of ``{"type": "text", "text": ...}`` parts). Anything else is ``str()``-ed so a
    reward never crashes on an odd value; it simply fails to match.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        msgs = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in msgs if m.get("role", "assistant") == "assistant"] or msgs
        return "\n".join(_content_text(m.get("content", "")) for m in assistant)
    return "" if completion is None else str(completion)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return "" if content is None else str(content)


def split_think(text: str) -> tuple[str | None, str, bool]:
    """Split a completion into ``(reasoning, answer, well_formed)``.

    - ``<think>R</think>A`` -> ``(R, A, True)``.
    - ``R</think>A`` (chat templates such as R1's put ``<think>`` in the prompt) -> ``(R, A, True)``.
    - ``<think>R`` never closed -> ``(R, "", False)``: the model never reached an answer.
    - no think tags -> ``(None, text, True)``.
    The answer is whatever follows the *last* ``</think>``.
    """
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        head = text[:close]
        open_ = head.find(THINK_OPEN)
        reasoning = head[open_ + len(THINK_OPEN):] if open_ >= 0 else head
        return reasoning, text[close + len(THINK_CLOSE):], True
    open_ = text.find(THINK_OPEN)
    if open_ >= 0:
        return text[open_ + len(THINK_OPEN):], "", False
    return None, text, True
