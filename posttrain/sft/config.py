"""`SFTRecipeConfig`: TRL's `SFTConfig` plus the DeepSeek-V3 SFT settings (MTP, balancing, data policy).

Field names follow TRL/transformers (`model_name_or_path`, `dataset_name`, `output_dir`, `max_steps`,
`learning_rate`, `max_length`, `per_device_train_batch_size`, …). Defaults that differ from TRL's:

* report §5.2 SFT schedule: 2 epochs, cosine decay 5e-6 → 1e-6 (`cosine_with_min_lr`, `min_lr` 1e-6);
* CPU-friendly: fp32 (`bf16=False`; TRL defaults to bf16, ~7× slower on CPUs without bf16 units)
  and no gradient checkpointing unless asked;
* `packing=True` (sample-masked BFD packing) and `assistant_only_loss=True`;
* `report_to="none"`, `save_only_model=False` (checkpoints are resumable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers.trainer_utils import IntervalStrategy
from trl import SFTConfig

from ..errors import ConfigError
from ..lm_loss import LM_LOSS_BACKENDS
from ..trainer_args import RunDirFields, V3TrainingFields, check_mtp_loss_weight, check_training_sizes

# LoRA targets (item 7): MLA projections and the dense / shared-expert MLPs. The routed experts are
# fused 3-D parameters (`mlp.experts.gate_up_proj`), which peft's Linear LoRA does not wrap, and the
# router is not a Linear either; both stay frozen under LoRA.
DEFAULT_LORA_TARGETS = [
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


# TRL SFTConfig fields that only TRL's SFTTrainer reads. This pipeline tokenizes, packs and computes the
# loss itself (posttrain/sft/trainer.py says why it is not SFTTrainer), so a value other than these would
# be dropped without a word: field -> (the values that change nothing, what to do instead).
UNAPPLIED_TRL_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "loss_type": (("nll", "chunked_nll"), "the loss is the next-token NLL plus λ·MTP (mtp_loss_weight)"),
    "router_aux_loss_coef": ((None,), "balancing is aux-loss-free (bias_update_speed) with the sequence-wise "
                             "loss seq_balance_alpha"),
    "chat_template_path": ((None,), "the chat template is the model directory's tokenizer's"),
    "eos_token": ((None,), "the end-of-turn token is the model directory's tokenizer's eos_token"),
    "pad_token": ((None,), "pad tokens are never targets and sit in their own segment"),
    "dataset_text_field": (("text",), "rows are conversational (`messages`) or `prompt` + `completion`"),
    "dataset_kwargs": ((None,), "the data is always tokenized and packed here"),
    "truncation_mode": (("keep_start",), "`truncation` says what happens to samples longer than max_length"),
    "shuffle_dataset": ((False,), "packed rows are drawn in random order each epoch (seed, data_seed)"),
    "eval_packing": ((None, True), "dataset_test_split is packed like the training split"),
    "activation_offloading": ((False,), "gradient_checkpointing (offload in gradient_checkpointing_kwargs) "
                              "saves activation memory"),
}

@dataclass
class SFTRecipeConfig(RunDirFields, V3TrainingFields, SFTConfig):
    """Configuration of `dsv3-posttrain sft` (sample-masked SFT of the whole V3 model).

    Everything in TRL's `SFTConfig` / transformers' `TrainingArguments` applies, except the SFTTrainer
    options in `UNAPPLIED_TRL_FIELDS` (refused, and left out of `--help`); the fields below are added or
    have other defaults. See each field's `help`.
    """

    unapplied_fields: ClassVar[tuple[str, ...]] = tuple(UNAPPLIED_TRL_FIELDS)

    # --- model and data ------------------------------------------------------------------------
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to fine-tune: a local Hugging Face directory in the DeepSeek layout (MTP keys "
                  "at model.layers.{num_hidden_layers}) or a Hub id. Loaded with DeepseekV3ForCausalLMWithMTP."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel for the packed rows. Unset: 'flex_attention' on CUDA (a document mask "
                  "built from the position_ids restarts: no L^2 mask tensor, one compile instead of cuDNN's "
                  "per-row-width plans) and 'sdpa_segmented' on CPU (one causal SDPA call per packed sample; flex "
                  "has no CPU backward). 'flash_attention_2' (if installed) uses its varlen path; 'sdpa' and 'eager' "
                  "also isolate samples, through a dense [L, L] mask (see padding_free). "
                  "posttrain/sft/attention.py."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: a distill output directory, a local .jsonl/.json/.parquet file or shard "
                  "directory, or a Hub id (read with data_pipelines.loading.load_rows). Rows are conversational "
                  "(`messages`) or prompt-completion (`prompt` + `completion`)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate on (eval_lm_loss, eval_mtp_loss) when eval_strategy is not 'no'; "
                  "tokenized and packed like the training split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of the split (quick runs)."}
    )
    max_length: int = field(
        default=1024,
        metadata={"help": "Packed row length in tokens (an integer >= 2; unlike TRL, not None: it is also the "
                  "longest sample). Longer samples are dropped or cut, as `truncation` says."},
    )
    truncation: str = field(
        default="drop",
        metadata={"help": "Samples longer than max_length: 'drop' them (default: a truncated response loses its "
                  "answer and end-of-turn token) or 'truncate' them (keep the first max_length tokens). Counted "
                  "in the run summary either way.", "choices": ["drop", "truncate"]},
    )
    on_bad_row: str = field(
        default="error",
        metadata={"help": "A malformed row (no `messages`, no assistant turn, bad message dicts): 'error' stops "
                  "with a message naming the row; 'skip' drops it and counts it.", "choices": ["error", "skip"]},
    )

    # --- MTP (report §2.2) ---------------------------------------------------------------------
    mtp_loss_weight: float = field(
        default=0.3,
        metadata={"help": "λ of the MTP loss (report §2.2: 0.3, then 0.1); 0 trains no MTP (the module is "
                  "then not run)."},
    )
    mtp_loss_weight_final: float | None = field(
        default=None,
        metadata={"help": "λ after `mtp_loss_weight_switch` of the training steps (the report drops 0.3 → 0.1 "
                  "after 10T of 14.8T tokens); None keeps mtp_loss_weight throughout."},
    )
    mtp_loss_weight_switch: float = field(
        default=10.0 / 14.8,
        metadata={"help": "Fraction of max_steps after which mtp_loss_weight_final applies."},
    )
    chunked_lm_loss: bool = field(
        default=True,
        metadata={"help": "Compute the LM and MTP losses with a chunked LM head + cross-entropy "
                  "(`lm_loss_backend` picks the implementation): the [tokens, vocab] logits are never "
                  "materialised, same loss and gradients. Used in training and in loss-only evaluation. "
                  "posttrain/lm_loss.py lm_head_cross_entropy."},
    )
    lm_loss_backend: str = field(
        default="auto",
        metadata={"help": "The chunked head's implementation: 'fused' (logits turned into their gradient in the "
                  "forward: three GEMMs per head, the head's weight gradient held until the backward), "
                  "'recompute' (the logits recomputed in the backward: four GEMMs), 'trl' (TRL's chunked "
                  "log-prob kernel, four GEMMs) or 'auto' (fused on CUDA, recompute on CPU)."},
    )

    # --- routing balance (report §2.1.2) -------------------------------------------------------
    seq_balance_alpha: float = field(
        default=1e-4,
        metadata={"help": "α of the complementary sequence-wise balance loss (report eq. 17-20), per packed "
                  "sample, summed over MoE layers. 0 disables it."},
    )
    balance_history_interval: int = field(
        default=1,
        metadata={"help": "Record the per-layer expert load every N optimizer steps for expert_load.png "
                  "(0: no history, no plot)."},
    )

    # --- LoRA (item 7) ---------------------------------------------------------------------------
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (peft) instead of the full model; merged into the weights on export. "
                  "Only the lora_target_modules train (main layers and the MTP module alike); the fused routed "
                  "experts, the router weights, norms, embedding, lm_head and the MTP eh_proj stay frozen unless "
                  "named there (routed experts and router cannot be). The balancer still updates the routers' "
                  "e_score_correction_bias and the MTP loss is still computed."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Module names that get adapters: MLA projections and dense / shared-expert MLPs (the "
                  "fused routed experts cannot take Linear LoRA)."},
    )

    # --- output ----------------------------------------------------------------------------------
    save_final_model: bool = field(
        default=True,
        metadata={"help": "Write the trained model (DeepSeek layout, MTP keys, updated biases; LoRA merged) and "
                  "tokenizer to output_dir at the end."},
    )


    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "accelerate config file for multi-GPU runs (e.g. recipes/accelerate/fsdp2-*.yaml): the "
                  "launcher (`accelerate launch --config_file`) reads it; run_sft itself does not."},
    )

    # --- TRL / transformers fields with other defaults -----------------------------------------
    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate (report §5.2: 5e-6)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs over the data (report §5.2: 2)."})
    lr_scheduler_type: str = field(
        default="cosine_with_min_lr",
        metadata={"help": "LR schedule (report §5.2: cosine decay to 1e-6, i.e. cosine_with_min_lr + min_lr)."},
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Scheduler arguments. Unset (or {}) with a *_with_min_lr schedule: {'min_lr': 1e-6}, the "
                  "report's 5e-6 → 1e-6 cosine; unset with any other schedule: none."},
    )
    bf16: bool | None = field(
        default=False,
        metadata={"help": "bf16 mixed precision. Off by default: on CPUs without bf16 units it is ~7x slower; "
                  "set it on GPUs."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."}
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Sample-masked packing: best-fit-decreasing into rows of max_length; each sample attends "
                  "only to itself and its positions restart at 0."},
    )
    packing_strategy: str = field(
        default="bfd", metadata={"help": "Only 'bfd' (best-fit decreasing, TRL's engine) is supported."}
    )
    padding_free: bool | None = field(
        default=None,
        metadata={"help": "Flatten each batch of packed rows into one row: no pad tokens at all. None (default): on "
                  "when the attention kernel reads sample boundaries from position_ids without a mask "
                  "(flex_attention's document mask, the CUDA default; sdpa_segmented, the CPU default; "
                  "flash_attention_2's varlen path); off for sdpa/eager, whose "
                  "masked attention over one flattened row would cost (batch tokens)^2."},
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad each packed row (or the flattened row) to a multiple of this many tokens, with a pad "
                  "segment that is never a target; 1 never pads. 'auto' or null: 128 when fp8 trains on CUDA "
                  "(one FP8 tile, so no FP8 GEMM copies its operands into padded buffers), else no padding; "
                  "'auto' also pads to 128 on Neuron (AWS Trainium), as in TRL."},
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Loss on assistant tokens only (end-of-turn token included), from the chat template's "
                  "{% generation %} spans. False: loss on every token but each sample's first."},
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Logging integrations."})
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation keeps losses only (no [batch, seq, vocab] logits gathered)."}
    )

    def __post_init__(self):
        for name, (no_effect, instead) in UNAPPLIED_TRL_FIELDS.items():
            value = getattr(self, name)
            if value not in no_effect and not (name == "dataset_kwargs" and value == {}):
                raise ConfigError(f"{name}={value!r} is an option of TRL's SFTTrainer that this SFT does not apply: "
                                  f"{instead}; leave it unset")
        if self.truncation not in ("drop", "truncate"):
            raise ConfigError(f"truncation must be 'drop' or 'truncate', got {self.truncation!r}")
        if self.on_bad_row not in ("error", "skip"):
            raise ConfigError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        n = self.max_train_samples  # 0 said "the dataset is empty" of a file with rows
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"max_train_samples must be an integer >= 1 (or unset for every row), got {n!r}")
        if self.lm_loss_backend not in LM_LOSS_BACKENDS:
            raise ConfigError(f"lm_loss_backend must be one of {', '.join(LM_LOSS_BACKENDS)}, got {self.lm_loss_backend!r}")
        from ..fp8.training import check_fp8_fields

        check_fp8_fields(self)
        if self.packing and self.packing_strategy != "bfd":
            raise ConfigError(f"packing_strategy {self.packing_strategy!r}: only 'bfd' keeps samples whole")
        self.mtp_loss_weight = check_mtp_loss_weight(self.mtp_loss_weight)
        if self.mtp_loss_weight_final is not None:
            self.mtp_loss_weight_final = check_mtp_loss_weight(self.mtp_loss_weight_final, field_name="mtp_loss_weight_final")
        if not 0.0 <= self.mtp_loss_weight_switch <= 1.0:
            raise ConfigError(f"mtp_loss_weight_switch must be in [0, 1], got {self.mtp_loss_weight_switch}")
        if self.bias_update_speed < 0 or self.seq_balance_alpha < 0:
            raise ConfigError("bias_update_speed and seq_balance_alpha must be >= 0")
        if self.max_length is None or self.max_length < 2:
            raise ConfigError("max_length must be an integer >= 2 (it is also the packed row length)")
        if not self.lr_scheduler_kwargs:
            # the report's floor for the schedules that take one; kept as a default for the others it failed them
            # (`--lr_scheduler_type linear`: "unexpected keyword argument 'min_lr'")
            with_min_lr = str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)).endswith("_with_min_lr")
            self.lr_scheduler_kwargs = {"min_lr": 1e-6} if with_min_lr else {}
        if self.eval_strategy not in ("no", IntervalStrategy.NO) and not self.dataset_test_split:
            # transformers refuses it only when the trainer is built, after the data and the model are loaded
            raise ConfigError(f"eval_strategy {getattr(self.eval_strategy, 'value', self.eval_strategy)!r} needs "
                              "dataset_test_split, the split of dataset_name to evaluate on (e.g. a directory with "
                              "train.jsonl and test.jsonl, split 'test')")
        check_training_sizes(self)
        if self.use_lora:
            if self.lora_r < 1:
                raise ConfigError(f"lora_r must be >= 1 with use_lora, got {self.lora_r}")
            if self.lora_alpha <= 0:
                # the update is scaled by lora_alpha / lora_r: 0 leaves the adapters without gradient
                raise ConfigError(f"lora_alpha must be > 0 with use_lora, got {self.lora_alpha}")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            if not self.lora_target_modules:
                raise ConfigError("lora_target_modules is empty: use_lora needs at least one module name")
        if self.attn_implementation:
            _check_attn_implementation(self.attn_implementation)
        if self.gradient_checkpointing:
            # Reentrant checkpointing runs the first forward without grad: the router logits the
            # sequence-wise balance loss is built from would carry no gradient.
            kwargs = dict(self.gradient_checkpointing_kwargs or {}) if isinstance(
                self.gradient_checkpointing_kwargs, dict) else {}
            kwargs.setdefault("use_reentrant", False)
            self.gradient_checkpointing_kwargs = kwargs
        if self.attn_implementation and self.attn_implementation.startswith("flash_attention"):
            # transformers' varlen path reads sample boundaries from position_ids of one flat row.
            self.padding_free = True
        from ..trainer_args import apply_process_defaults

        # λ = 0 from the start, or after the schedule's switch, leaves the MTP module out of the loss
        apply_process_defaults(self, self.mtp_loss_weight == 0 or self.mtp_loss_weight_final == 0)
        ptm, bad = self.pad_to_multiple_of, f"pad_to_multiple_of must be a positive integer, 'auto' or null, got {self.pad_to_multiple_of!r}"
        if isinstance(ptm, str) and ptm.lower() not in ("auto", "none", "null") and not ptm.isdigit():
            raise ConfigError(bad)
        super().__post_init__()  # TRL turns "auto" into None off Neuron, and "128" into 128
        ptm = self.pad_to_multiple_of
        if ptm is not None and (not isinstance(ptm, int) or isinstance(ptm, bool) or ptm < 1):
            raise ConfigError(bad)

    def resolved_attn_implementation(self) -> str:
        """The kernel the model is loaded with: the field, or the device's default for packed rows."""
        from .attention import default_attn_implementation, register_segmented_sdpa

        attn = self.attn_implementation or default_attn_implementation("cpu" if self.use_cpu or not _cuda() else "cuda")
        if attn == "sdpa_segmented":
            register_segmented_sdpa()
        return attn

    def resolved_pad_to_multiple_of(self) -> int | None:
        """Packed rows (or the flattened row) padded to a multiple of this many tokens: the field if it is a number
        (1: never pad); for ``auto`` (TRL's default) or null, 128 when FP8 layers train on the GPU (see
        posttrain.fp8.training.fp8_row_multiple), else no padding."""
        if isinstance(self.pad_to_multiple_of, int):
            return self.pad_to_multiple_of
        if self.fp8:
            from ..fp8.training import fp8_row_multiple

            return fp8_row_multiple("cpu" if self.use_cpu or not _cuda() else "cuda")
        return None

    def resolved_padding_free(self) -> bool:
        if self.padding_free is not None:
            return bool(self.padding_free)
        from .attention import reads_samples_from_positions

        return reads_samples_from_positions(self.resolved_attn_implementation())

    def mtp_weight_at(self, step: int, max_steps: int) -> float:
        """λ at optimizer step `step` (0-based) of `max_steps`."""
        if self.mtp_loss_weight_final is None or max_steps <= 0:
            return self.mtp_loss_weight
        return self.mtp_loss_weight if step < self.mtp_loss_weight_switch * max_steps else self.mtp_loss_weight_final

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` (fp32 weights unless model_init_kwargs say otherwise)."""
        import torch

        kwargs: dict[str, Any] = {"dtype": torch.float32}
        attn = self.resolved_attn_implementation()
        if attn == "flex_attention" and (self.use_cpu or not _cuda()):
            # checked here, not when the recipe is parsed: a GPU recipe may be validated on a CPU host
            from .attention import FLEX_CPU_ERROR

            raise ConfigError(FLEX_CPU_ERROR)
        kwargs["attn_implementation"] = attn
        extra = dict(self.model_init_kwargs or {}) if isinstance(self.model_init_kwargs, dict) else {}
        if isinstance(extra.get("dtype"), str) and extra["dtype"] != "auto":
            extra["dtype"] = getattr(torch, extra["dtype"])
        kwargs.update(extra)
        return kwargs


def _check_attn_implementation(name: str) -> None:
    """transformers checks the kernel name only when the model loads; here it is checked with the recipe."""
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from .attention import SEGMENTED_SDPA

    known = ["eager", SEGMENTED_SDPA, *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name in known or is_kernel(name):  # is_kernel: a Hub kernel repo such as kernels-community/flash-attn3
        return
    import difflib

    close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"attn_implementation {name!r} is not a known attention kernel{hint} (choose one of "
                      f"{', '.join(known)}, a Hub kernel repo id, or leave it unset for the device's default)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
