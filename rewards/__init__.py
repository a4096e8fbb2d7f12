"""Reward functions for GRPO scoring and distillation rejection sampling.

One API (TRL's ``reward_funcs`` contract): a reward is ``f(prompts, completions, **columns)
-> list[float | None]``. Find rewards with :func:`resolve` / :func:`list_rewards`, score a
batch with :func:`score_rewards` or a :class:`RewardSuite`. Built-in rule-based verifiers
follow the DeepSeek-V3 report §5.2.1 (math answers in a box, code run against tests).

This package never imports ``posttrain``, ``data_pipelines`` or ``eval_hooks``.
"""

from .code_reward import CodeTests, code_tests, code_tests_all, extract_code, make_code_tests, outputs_match, parse_tests
from .errors import RewardError, RowFailure
from .format_reward import (
    FormatReward,
    LanguageConsistency,
    format_reward,
    language_consistency,
    make_format_reward,
    make_language_consistency,
)
from .length_reward import SoftOverlong, make_soft_overlong, soft_overlong
from .math_verifier import (
    MathAccuracy,
    extract_final_answer,
    gold_answer_text,
    make_math_accuracy,
    math_accuracy,
    verify_math,
    verify_math_batch,
)
from .registry import (ENTRY_POINT_GROUP, RewardInfo, builtin_names, check_spec, gold_column, list_rewards, resolve,
                       resolve_named)
from .sandbox import SandboxLimits, SandboxResult, run_python
from .scoring import GuardedReward, RewardFailure, RewardResult, RewardSuite, score_rewards
from .text import completion_text, split_think

__all__ = [
    "RewardError", "RowFailure",
    # API
    "resolve", "resolve_named", "check_spec", "list_rewards", "builtin_names", "gold_column", "RewardInfo",
    "ENTRY_POINT_GROUP",
    "score_rewards", "RewardSuite", "RewardResult", "RewardFailure", "GuardedReward",
    "completion_text", "split_think",
    # math
    "math_accuracy", "make_math_accuracy", "MathAccuracy", "extract_final_answer", "verify_math", "verify_math_batch",
    "gold_answer_text",
    # code
    "code_tests", "code_tests_all", "make_code_tests", "CodeTests", "extract_code", "parse_tests", "outputs_match",
    "run_python", "SandboxLimits", "SandboxResult",
    # shaping
    "format_reward", "make_format_reward", "FormatReward",
    "language_consistency", "make_language_consistency", "LanguageConsistency",
    "soft_overlong", "make_soft_overlong", "SoftOverlong",
]
