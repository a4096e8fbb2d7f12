"""The GRPO recipe: TRL's `GRPOConfig` plus what V3 needs (MTP, balancing, rewards, data).

Every TRL/transformers field keeps its meaning (`learning_rate`, `num_generations`, `beta`,
`epsilon`, `loss_type`, `max_completion_length`, `use_vllm`, `vllm_mode`, …). Defaults differ
where the DeepSeek papers or this CPU say so; each such default is commented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from trl import GRPOConfig

from ..errors import ConfigError
from ..trainer_args import (RunDirFields, V3TrainingFields, check_mtp_loss_weight, check_training_sizes,
                            normalize_scale_rewards)


# The loss types TRL's GRPOTrainer implements (TRL 1.16, the range pinned in engines.compat.TRL): TRL keeps
# no list of them in code and checks the name only inside the first loss computation, after the model and
# engine are up. tests/test_grpo_config.py checks the list against the `loss_type` help TRL documents.
TRL_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")


def check_reward_weights(reward_funcs: Sequence[str], reward_weights: Sequence[float] | None) -> None:
    """One weight per reward function, or none at all (1.0 each). Zipped, a short list would drop the
    last rewards silently; TRL rejects a long one only after the model is loaded."""
    if reward_weights is not None and len(reward_weights) != len(reward_funcs):
        raise ConfigError(
            f"reward_weights has {len(reward_weights)} weight(s) {list(reward_weights)} for {len(reward_funcs)} "
            f"reward_funcs {list(reward_funcs)}: give one weight per reward function, in the same order, or leave "
            "reward_weights unset (1.0 each)"
        )


@dataclass
class GRPORecipeConfig(RunDirFields, V3TrainingFields, GRPOConfig):
    # -- model and data -------------------------------------------------------------------------
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy checkpoint: a local Hugging Face directory in the DeepSeek layout, "
                                "not a Hub id (download one first: hf download ORG/NAME --local-dir DIR)."}
    )
    dataset_name: str = field(
        default="builtin:arith",
        metadata={"help": "Prompt dataset: `builtin:arith`, a local jsonl/parquet file or directory, or a Hub id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset_name` to train on."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column with the prompt (chat messages or text); TRL reads it as `prompt`, "
                                    "the rewards get it under its own name too."}
    )
    answer_column: str = field(
        default="answer", metadata={"help": "Column with the gold answer, passed to rewards as `answer` and under its "
                                    "own name. Left at `answer`, a dataset with TRL's `solution` column instead uses that."}
    )
    max_prompts: int | None = field(
        default=None, metadata={"help": "Use at most this many prompts (>= 1; None: all)."}
    )
    # -- rewards -------------------------------------------------------------------------------
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_accuracy"],
        metadata={
            "help": "Reward functions by name: a built-in (`dsv3-posttrain rewards list`), `module:function`, "
            "`path/file.py:function` or an installed plugin. Weights go in `reward_weights`."
        },
    )
    reward_failure_policy: str = field(
        default="error",
        metadata={"help": "A reward that raises, hangs, returns the wrong length or NaN: `error` stops the run "
                  "naming the reward and row; `skip` scores that row None and counts it in rewards/<name>/failures."},
    )
    reward_timeout_s: float | None = field(
        default=120.0, metadata={"help": "Per-call timeout of each reward, in seconds (> 0; null: none)."}
    )
    # -- dynamic sampling (DAPO §3.2) -------------------------------------------------------------
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "Drop groups whose rewards all tie (zero advantage) before the loss and sample more "
                  "prompts, in extra engine calls, until the batch is full of groups with reward spread (DAPO "
                  "§3.2). Extra prompts are drawn from the training set by (seed, step, round): reruns and "
                  "resumed runs sample the same. Logged: sampling/groups_dropped, sampling/rounds, "
                  "timing/extra_generation; frac_reward_zero_std is then that of the trained batch."},
    )
    max_sampling_rounds: int = field(
        default=3,
        metadata={"help": "With dynamic_sampling: engine calls per step at most, the first included. If the "
                  "batch is still short, it trains on the groups with spread it has."},
    )
    # -- V3 specifics ---------------------------------------------------------------------------
    mtp_loss_weight: float | str = field(
        default=0.3,
        metadata={"help": "λ of the MTP loss on the policy's own samples (V3 report §2.2); 0 leaves the MTP "
                  "module untouched (its acceptance rate is still measured). `auto`: closed loop — λ starts at "
                  "0.3 and is adjusted after every step from the measured MTP acceptance (the engine's "
                  "`rollout/spec_accept_rate` when it logs one, else `mtp/accept_rate`) to hold acceptance at its "
                  "value at the start of GRPO at the least MTP loss weight (posttrain/grpo/mtp_control.py); "
                  "logged as `mtp_loss_weight`."},
    )
    mtp_loss_weight_min: float = field(
        default=0.05, metadata={"help": "With mtp_loss_weight=auto: the floor λ decays toward while acceptance holds "
                                "(from 0.05, ×1.5 a step gets back to the start's 0.3 in 5 steps when acceptance "
                                "falls; from 0.01 it takes 9)."}
    )
    mtp_loss_weight_max: float = field(
        default=1.0, metadata={"help": "With mtp_loss_weight=auto: the ceiling λ rises to while acceptance is low."}
    )
    mtp_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the MTP module's own weights (None: learning_rate), on the same "
                  "schedule. The drafter has to follow a moving policy; under Adam λ sets how hard the MTP loss pulls "
                  "the shared trunk, not how fast the MTP module's own weights move (Adam normalises their gradient, "
                  "which comes from the MTP loss alone), so this is what sets that speed."},
    )
    seq_balance_alpha: float = field(
        default=0.0, metadata={"help": "α of the sequence-wise balance loss (V3 report eq. 17); 0 disables."}
    )
    vllm_dtype: str = field(default="float32", metadata={"help": "dtype of the colocated vLLM engine."})
    rollout_speculative_tokens: int = field(
        default=0,
        metadata={"help": "k > 0: MTP-speculative rollouts (V3 report §5.4.3): the colocated vLLM engine drafts k "
                  "tokens per step with the policy's own MTP module and verifies them with the policy, so samples keep "
                  "the policy's distribution; every weight sync updates the drafter too, and the engine's draft "
                  "acceptance is logged as rollout/spec_accept_rate. 0: off. Needs vllm_mode: colocate and a checkpoint "
                  "with an MTP module. Samples differ from k = 0's at the same seed (not in distribution)."},
    )
    # -- defaults that differ from TRL's ---------------------------------------------------------
    # DeepSeekMath's GRPO: per-sequence normalised loss with a k3 KL penalty (TRL's default is dapo, β=0).
    loss_type: str = field(
        default="grpo",
        metadata={"help": f"TRL's loss formulation: {' | '.join(TRL_LOSS_TYPES)}.", "choices": list(TRL_LOSS_TYPES)},
    )
    beta: float = field(default=0.001, metadata={"help": "KL coefficient β (k3 estimator); 0 loads no reference model."})
    use_vllm: bool = field(
        default=True, metadata={"help": "Sample with vLLM (colocated, or a server with vllm_mode=server); "
                                "False falls back to transformers generate."}
    )
    # Truncated importance sampling per token against the engine's sampling log-probs.
    vllm_importance_sampling_mode: str = field(
        default="token_truncate", metadata={"help": "TIS granularity: token_truncate | token_mask | sequence_*."}
    )
    vllm_importance_sampling_clip_max: float = field(default=2.0, metadata={"help": "TIS cap."})
    old_logps_from_training_forward: bool = field(
        default=True,
        metadata={"help": "When each optimizer step trains only on rollouts generated at its start "
                  "(gradient_accumulation_steps a multiple of steps_per_generation x num_iterations, the default), "
                  "the old policy is the training forward's own: TIS and rollout/logprob_diff_* take its detached "
                  "log-probs, as TRL does without vLLM, and no separate forward scores the batch (nor the groups "
                  "dynamic_sampling drops) before training. The same numbers up to floating-point order, one forward "
                  "fewer per step. False: a separate no-grad forward, as TRL does with vLLM (always so when rollouts are reused "
                  "over several optimizer steps)."},
    )
    # On CPU bf16 is several times slower than fp32 and gradient checkpointing only costs time.
    bf16: bool = field(default=False, metadata={"help": "Train in bf16 (GPU)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    use_cpu: bool = field(
        default=False, metadata={"help": "Train on CPU even if a GPU is present (always on when there is none)."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    learning_rate: float = field(default=2e-6, metadata={"help": "Peak learning rate (R1 used 3e-6)."})
    num_generations: int | None = field(
        default=8, metadata={"help": "Group size G, >= 2 (R1: 16, DeepSeekMath: 64)."}
    )
    save_strategy: str = field(default="steps", metadata={"help": "When to checkpoint: steps | epoch | no."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "Loggers: none, wandb, tensorboard, …"})

    def __post_init__(self):
        if self.reward_failure_policy not in ("error", "skip"):
            raise ValueError(f"reward_failure_policy must be 'error' or 'skip', got {self.reward_failure_policy!r}")
        if not self.reward_funcs:
            raise ValueError("`reward_funcs` is empty: name at least one reward function")
        check_reward_weights(self.reward_funcs, self.reward_weights)
        if self.max_prompts is not None and self.max_prompts < 1:  # 0 would train 0 steps and save the input model
            raise ValueError(f"max_prompts must be >= 1 (or unset: all prompts), got {self.max_prompts}")
        if self.loss_type not in TRL_LOSS_TYPES:  # TRL checks it only inside the first loss computation
            raise ValueError(f"loss_type must be one of {', '.join(TRL_LOSS_TYPES)}, got {self.loss_type!r}")
        # TRL checks these two only at the first step's advantages, after the model and the engine are up
        self.scale_rewards = normalize_scale_rewards(self.scale_rewards)
        if self.multi_objective_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ValueError("multi_objective_aggregation must be sum_then_normalize or normalize_then_sum, got "
                             f"{self.multi_objective_aggregation!r}")
        if not self.temperature > 0:  # TRL divides the logits by it (ZeroDivisionError in the first log-probs)
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.reward_timeout_s is not None and not self.reward_timeout_s > 0:
            raise ValueError(f"reward_timeout_s must be > 0 seconds (or null: no timeout), got {self.reward_timeout_s}")
        # TRL needs >= 2 for the group advantages, but divides by it before it says so (ZeroDivisionError on 0)
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares each prompt's completions), "
                             f"got {self.num_generations}")
        check_training_sizes(self)
        self.mtp_loss_weight = check_mtp_loss_weight(self.mtp_loss_weight, allow_auto=True)
        if not 0 <= self.mtp_loss_weight_min <= self.mtp_loss_weight_max:
            raise ValueError("mtp_loss_weight_min and mtp_loss_weight_max must satisfy 0 <= min <= max")
        if self.mtp_learning_rate is not None and not self.mtp_learning_rate > 0:
            raise ValueError(f"mtp_learning_rate must be > 0 (or unset: learning_rate), got {self.mtp_learning_rate}")
        if self.rollout_speculative_tokens < 0:
            raise ValueError("rollout_speculative_tokens must be >= 0 (0: no speculative rollouts)")
        if self.max_sampling_rounds < 1:
            raise ValueError("max_sampling_rounds must be >= 1")
        # TRL's own generation applies these; the rollout engines (run.build_engine) take temperature, top_p and
        # top_k only (engines.SamplingSettings) and set up vLLM / transformers generate themselves, so a recipe's
        # value would be dropped without a word
        sampling, setup = "they sample with temperature, top_p and top_k only", "they set up vLLM and generate themselves"
        ignored = {"repetition_penalty": (self.repetition_penalty != 1.0, sampling),
                   "min_p": (self.min_p is not None, sampling),
                   "generation_kwargs": (bool(self.generation_kwargs), sampling),
                   "vllm_structured_outputs_regex": (self.vllm_structured_outputs_regex is not None, sampling),
                   "vllm_enable_sleep_mode": (self.vllm_enable_sleep_mode, setup),
                   "vllm_model_impl": (self.vllm_model_impl != "vllm", setup),
                   "cache_implementation": (self.cache_implementation is not None, setup),
                   "use_transformers_continuous_batching": (self.use_transformers_continuous_batching, setup),
                   "use_transformers_paged": (self.use_transformers_paged, setup)}
        for name, (is_set, why) in ignored.items():
            if is_set:
                raise ValueError(f"{name}={getattr(self, name)!r} is not applied by the rollout engines ({why}): "
                                 "leave it unset")
        from ..fp8.training import check_fp8_fields

        check_fp8_fields(self)
        from ..trainer_args import apply_process_defaults

        apply_process_defaults(self, self.mtp_loss_weight == 0)
        super().__post_init__()
