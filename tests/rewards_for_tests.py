"""Reward functions the tests load by `path/file.py:function`, the way users plug theirs in."""


def length_reward(prompts, completions, **kwargs):
    """Varies within every group, so advantages are non-zero even for an untrained model."""
    return [len(str(c)) / 50.0 for c in completions]
