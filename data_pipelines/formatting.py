"""Chat-message formatting shared by the task generator and the distillation pipeline.

The DeepSeek-V3 report (§5.1, "Reasoning Data") builds two SFT sample types per
instance: ``<problem, original response>`` and ``<system prompt, problem, R1 response>``,
the system prompt asking the model to reflect and verify.  Both are plain chat
``messages`` lists so SFT can read them with the tokenizer's chat template.
"""

from __future__ import annotations

from typing import Any

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful reasoner. Think through the problem step by step inside "
    "<think> </think> tags. Reflect on each step, verify your result by checking it "
    "another way, and correct any mistake you find. After </think>, give the final "
    "answer in the form \\boxed{answer}."
)

SAMPLE_TYPE_ORIGINAL = "original"  # <problem, original response>
SAMPLE_TYPE_R1 = "r1_system"  # <system prompt, problem, R1 response>


def user_messages(problem: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": problem}]


def with_system(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """Prepend ``system_prompt`` unless empty or the prompt already carries a system turn."""
    if not system_prompt or (messages and messages[0].get("role") == "system"):
        return [dict(m) for m in messages]
    return [{"role": "system", "content": system_prompt}] + [dict(m) for m in messages]


def strip_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(m) for m in messages if m.get("role") != "system"]


def sft_messages(prompt: list[dict[str, Any]], response: str) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt] + [
        {"role": "assistant", "content": response}
    ]
