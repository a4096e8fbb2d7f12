"""`RMRecipeConfig`: TRL's `RewardConfig` plus what `dsv3-posttrain rm train` needs (model, data, eval).

Field names follow TRL/transformers (`model_name_or_path`, `dataset_name`, `output_dir`, `max_steps`,
`learning_rate`, `max_length`, `per_device_train_batch_size`, …). Defaults that differ from TRL's:

* CPU-friendly: fp32 (`bf16=False`; TRL defaults to bf16, ~7x slower on CPUs without bf16 units) and
  no gradient checkpointing unless asked (TRL turns it on);
* `dataset_name="builtin:arith-preferences"`: correct-vs-wrong trace pairs of the built-in task;
* `report_to="none"`, `save_strategy="no"` (the final model is written to `output_dir` at the end).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import RewardConfig

from ..errors import ConfigError
from ..trainer_args import RunDirFields, sync_each_batch_under_fsdp
from .data import BUILTIN_NAME, without_inline_split


@dataclass
class RMRecipeConfig(RunDirFields, RewardConfig):
    """Configuration of `dsv3-posttrain rm train` (the V3-based reward model, report §5.2.1).

    Everything in TRL's `RewardConfig` / transformers' `TrainingArguments` applies (`max_length`
    drops pairs whose chosen or rejected side is longer; `center_rewards_coefficient`, …); the
    fields below are added or have other defaults. See each field's `help`.
    """

    # --- model and data ------------------------------------------------------------------------
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Backbone: a DeepSeek-V3-architecture checkpoint directory (causal-LM or an existing "
                  "reward model; the report builds the RM from the V3 SFT checkpoints) or a Hub id. Loaded as "
                  "DeepseekV3ForSequenceClassification with num_labels=1: a new scalar head on the last token."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: 'sdpa' (default) or 'eager'."}
    )
    dataset_name: str = field(
        default=BUILTIN_NAME,
        metadata={"help": "Preference pairs (prompt, chosen, rejected; optional margin and rationale — see "
                  "posttrain/rm/data.py): 'builtin:arith-preferences[:split][?n=N&seed=S&level=L&errors=E&balanced=1]' "
                  "(correct vs wrong arithmetic traces; errors: operation (default), misread or mixed), a local "
                  ".jsonl/.json/.parquet file or shard directory, or a Hub id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use only the first N pairs (for the built-in pairs: how many to generate; default 3200)."},
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out pairs for the final pairwise accuracy (chosen scored above rejected). Default: "
                  "for the built-in pairs the task's disjoint test split with balanced error directions "
                  "(builtin:arith-preferences?balanced=1), otherwise none."},
    )
    dataset_test_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name to evaluate on."})
    max_eval_samples: int | None = field(
        default=200, metadata={"help": "Evaluate on at most N held-out pairs (0: no final evaluation)."}
    )

    torch_num_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch during the run (restored afterwards); None keeps torch's default. "
                  "Small models train as fast on 1 thread, and many times faster when the cores are shared "
                  "(the tiny RM on 2 busy cores: 0.22 s/step on 1 thread, 0.5-1.9 s on 2)."},
    )

    # --- output ----------------------------------------------------------------------------------
    save_final_model: bool = field(
        default=True,
        metadata={"help": "Write the reward model (AutoModelForSequenceClassification layout) and tokenizer to "
                  "output_dir at the end; `rewards.resolve('reward_model:<output_dir>')` scores with it."},
    )

    # --- TRL / transformers fields with other defaults -----------------------------------------
    bf16: bool | None = field(
        default=False,
        metadata={"help": "bf16 mixed precision. Off by default: on CPUs without bf16 units it is ~7x slower; "
                  "set it on GPUs."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."}
    )
    save_strategy: str = field(
        default="no", metadata={"help": "Intermediate checkpoints: 'no' (default), 'steps' or 'epoch'."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Logging integrations."})

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8 or null, got {self.max_length}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be >= 1, got {self.max_train_samples}")
        if self.torch_num_threads is not None and self.torch_num_threads < 1:
            raise ConfigError(f"torch_num_threads must be >= 1 or null, got {self.torch_num_threads}")
        if self.max_eval_samples is not None and self.max_eval_samples < 0:
            raise ConfigError(f"max_eval_samples must be >= 0, got {self.max_eval_samples}")
        from engines.compat import prefer_regional_compilation

        from ..trainer_args import check_training_sizes

        check_training_sizes(self)
        prefer_regional_compilation(self)  # as SFT and GRPO (posttrain.trainer_args.apply_process_defaults)
        sync_each_batch_under_fsdp(self)
        super().__post_init__()

    def effective_eval_dataset(self) -> tuple[str, str] | None:
        """(dataset, split) the final held-out accuracy is measured on, or None."""
        if self.max_eval_samples == 0:
            return None
        if self.eval_dataset_name:
            return self.eval_dataset_name, self.dataset_test_split
        if self.dataset_name.startswith(BUILTIN_NAME):
            # The same generator on the test split (problems never in the train split), both error
            # directions equally frequent so that no prompt-blind rule beats 50% (see data.py).
            name = without_inline_split(self.dataset_name)
            if "balanced=" not in name:
                name += ("&" if "?" in name else "?") + "balanced=1"
            return name, self.dataset_test_split
        return None

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` (fp32 unless model_init_kwargs say otherwise)."""
        import torch

        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        extra = dict(self.model_init_kwargs or {}) if isinstance(self.model_init_kwargs, dict) else {}
        if isinstance(extra.get("dtype"), str) and extra["dtype"] != "auto":
            extra["dtype"] = getattr(torch, extra["dtype"])
        kwargs.update(extra)
        return kwargs
