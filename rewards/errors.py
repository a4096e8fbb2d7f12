"""The one exception type the rewards package raises for reward failures."""


class RewardError(Exception):
    """A reward could not be resolved or could not score a batch.

    Messages name the reward, and where it applies the row index and the cause, so a
    failed GRPO step or distillation run can be traced to one completion.
    """
