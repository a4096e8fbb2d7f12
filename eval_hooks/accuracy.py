"""Held-out accuracy through a rollout engine: greedy pass@1, and sampled pass@k / maj@k.

Correctness is the rewards package's math verifier (math-verify against the gold answer), the
same check GRPO's `math_accuracy` reward makes, so an evaluation and a reward never disagree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from engines import RolloutEngine, SamplingSettings


def _prompt_ids(tokenizer, prompt: Any) -> list[int]:
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def evaluate_accuracy(
    engine: RolloutEngine,
    tokenizer,
    prompts: Sequence[Any],
    answers: Sequence[str],
    *,
    k: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
    keep_token_ids: bool = False,
) -> dict[str, Any]:
    """pass@1 (greedy when `temperature` is 0); with `k` > 1 also pass@k and maj@k over k samples.

    Returns {"accuracy", "mean_correct", "n", "correct", "fraction_correct", "pass@k", "maj@k",
    "completions"}: `accuracy` is pass@1 over the first sample of each problem, `mean_correct` the
    fraction of all samples right (DeepSeek-R1's pass@1 when sampled), `fraction_correct` that fraction
    per problem. Sampling seeds are per prompt, so two checkpoints are compared on the same draws.
    `keep_token_ids`: also "token_ids", {"prompts": [ids], "completions": [[ids] * k]} per problem."""
    from rewards import extract_final_answer, math_accuracy

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if len(prompts) == 0:
        raise ValueError("nothing to evaluate: the evaluation set is empty")
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    sampling = SamplingSettings(
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed if temperature > 0 else None,
        stop_token_ids=[tokenizer.eos_token_id], logprobs=False,  # scored on the answers alone
    )
    outs = engine.generate(ids, k, sampling)
    texts = [[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group] for group in outs]
    flat_texts = [t for group in texts for t in group]
    flat_gold = [a for a, group in zip(answers, texts) for _ in group]
    scores = math_accuracy([""] * len(flat_texts), flat_texts, answer=flat_gold)
    correct = [[(scores[i * k + j] or 0.0) > 0.5 for j in range(k)] for i in range(len(prompts))]
    result: dict[str, Any] = {
        "accuracy": sum(c[0] for c in correct) / len(correct),
        "mean_correct": sum(sum(c) for c in correct) / (len(correct) * k),  # = mean math_accuracy reward
        "n": len(correct),
        "correct": [c[0] for c in correct],  # per problem, in order: paired comparisons between checkpoints
        "fraction_correct": [sum(c) / k for c in correct],
        "completions": [group[0] for group in texts],
    }
    if keep_token_ids:
        result["token_ids"] = {"prompts": ids, "completions": [[list(c.token_ids) for c in group] for group in outs]}
    if k > 1:
        result[f"pass@{k}"] = sum(any(c) for c in correct) / len(correct)
        majority = [_majority_is_right(group, c, extract_final_answer) for group, c in zip(texts, correct)]
        result[f"maj@{k}"] = sum(majority) / len(majority)
    return result


def _majority_is_right(texts: Sequence[str], correct: Sequence[bool], extract) -> float:
    """maj@k of one problem: the votes are the samples' final answers, and every answer the verifier accepts is
    one vote for the gold answer however it is written (5, 5.0, \\frac{10}{2}); a wrong answer votes with its
    equal strings. 1 when the gold answer has the most votes, 1/t when it ties with t - 1 others (the chance
    that a random tie-break picks it: independent of the samples' order), else 0."""
    votes: Counter = Counter()
    for text, right in zip(texts, correct):
        final = extract(text.split("</think>")[-1])
        if right:
            votes[_GOLD] += 1
        elif final is not None:
            votes[final.strip()] += 1
    if not votes[_GOLD]:
        return 0.0
    top = max(votes.values())
    return 1.0 / sum(1 for n in votes.values() if n == top) if votes[_GOLD] == top else 0.0


_GOLD = object()  # the vote of every sample the verifier accepts
