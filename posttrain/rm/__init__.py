"""The V3-based reward model (DeepSeek-V3 report §5.2.1, "Model-Based RM"): training.

* `data.py` — preference pairs: the built-in correct-vs-wrong trace pairs (`arith_preference_pairs`,
  `dataset_name: builtin:arith-preferences`) and user datasets, normalised to TRL's conversational
  preference form; the optional chain-of-thought (`rationale`) goes in front of each response.
* `model.py` — a V3 checkpoint as `DeepseekV3ForSequenceClassification(num_labels=1)`.
* `config.py` — `RMRecipeConfig` (TRL `RewardConfig` + model/data/eval fields).
* `run.py` — `run_rm_training(cfg)`: Bradley–Terry training with TRL's `RewardTrainer`, held-out
  pairwise accuracy, the saved RM directory.
* `cli.py` — `main_rm(argv)`: `dsv3-posttrain rm train` / `rm score`.

Scoring with a trained RM (GRPO, distillation, `rm score`) lives in `rewards/reward_model.py`
(`reward_model:PATH`), which does not import this package.
"""

from typing import Any

# Exported lazily: `posttrain.rm.cli` (the `rm` subcommand) must not pay for importing TRL on --help.
_EXPORTS = {
    "RMRecipeConfig": "config",
    "run_rm_training": "run",
    "pairwise_accuracy": "run",
    "arith_preference_pairs": "data",
    "load_preference_rows": "data",
    "to_preference_example": "data",
    "to_preference_examples": "data",
    "BUILTIN_NAME": "data",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
