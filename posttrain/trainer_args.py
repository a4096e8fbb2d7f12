"""What SFT and GRPO share in their transformers `TrainingArguments`: process defaults, the V3
training fields (declared once), the one MTP-weight check, and the one reading of `report_to`
that the recipe parser gives SFT, GRPO and RM alike."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# What TRL's and transformers' own parsers accept as "no logging integration".
_NO_REPORTING = ("none", "null", "")


def normalize_report_to(value: Any) -> str | list[str]:
    """`report_to` as transformers understands it: "none", "all" or a list of integration names.

    Accepts what a TRL user writes: `none` / `None` / null / [] / [none] (no reporting), `all`, one
    name, a comma-separated string or a list. transformers itself turns a `None` into `[None]` and
    fails in `Trainer.__init__` ("None is not supported"); an unknown name fails there too, after the
    model is loaded. Both are a `ConfigError` here, before anything is loaded."""
    if value is None:
        return "none"
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _NO_REPORTING:
            return "none"
        if text.lower() == "all":
            return "all"
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                import yaml

                value = yaml.safe_load(text)
        else:
            value = text.split(",")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"'report_to' expects none, all, a name or a list of names, got {value!r}")
    names = []
    for item in value:
        if item is None or (isinstance(item, str) and item.strip().lower() in _NO_REPORTING):
            continue
        if not isinstance(item, str):
            raise ConfigError(f"'report_to' expects integration names, got {item!r}")
        names.append(item.strip())
    if not names:
        return "none"
    if names == ["all"]:
        return "all"
    known = _known_integrations()
    for name in names:
        if known and name not in known:
            close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"'report_to': unknown integration {name!r}{hint} (choose none, all or any of "
                              f"{', '.join(known)})")
    return names


def check_reporting_installed(args: Any) -> None:
    """Each integration in `report_to` is installed here. transformers says so only when it builds the
    callback, after the model is loaded; the trainers call this before. (Not part of the config's own checks:
    a recipe for a cluster validates on a machine without its logger.)"""
    names = args.report_to if isinstance(args.report_to, list) else []
    installed = _installed_integrations() if names else None
    known = _known_integrations() if installed is not None else []
    for name in names:
        if installed is not None and name in known and name not in installed:
            raise ConfigError(f"'report_to': {name} is not installed in this environment (pip install it, or "
                              "leave it out of report_to)")


def _installed_integrations() -> list[str] | None:
    try:
        from transformers.integrations import get_available_reporting_integrations
    except ImportError:  # another transformers layout: let transformers judge
        return None
    return list(get_available_reporting_integrations())


# `resume_from_checkpoint`'s help in every recipe config (transformers' own says "Not directly used by
# Trainer", which is not so here: posttrain.checkpoints.resolve_resume reads it).
RESUME_HELP = ("Resume training: false / none (default) starts fresh; true / last resumes from the newest complete "
               "checkpoint-N in output_dir (an error if there is none); a path resumes from that checkpoint "
               "directory. A bare --resume_from_checkpoint means true.")


SCALE_REWARDS = ("group", "batch", "none")


def normalize_scale_rewards(value: Any) -> str:
    """GRPO's `scale_rewards` as TRL documents it: "group", "batch" or "none", with `true` meaning "group" and
    `false` "none". TRL types the field `str` and maps only real bools, so from a recipe parser `false` was
    refused, and from the command line "false" reached the first step's advantages and stopped there."""
    if isinstance(value, bool):
        return "group" if value else "none"
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "false"):
        return "group" if text == "true" else "none"
    if text not in SCALE_REWARDS:
        raise ConfigError(f"'scale_rewards' expects group, batch or none (true: group, false: none), got {value!r}")
    return text


def normalize_resume(value: Any) -> str | None:
    """`resume_from_checkpoint` as posttrain.checkpoints.resolve_resume reads it: None (start fresh),
    "last" or a checkpoint path. A YAML bool or a bare `--resume_from_checkpoint` flag is accepted;
    transformers types the field `str | None` and the recipe parser would reject `true`."""
    from .checkpoints import RESUME_LAST, RESUME_NO

    if value is None or value is False:
        return None
    if value is True:
        return "last"
    if not isinstance(value, str):
        raise ConfigError(f"'resume_from_checkpoint' expects true, false, last or a checkpoint directory, "
                          f"got {value!r}")
    text = value.strip()
    if text.lower() in RESUME_NO or text.lower() == "null":
        return None
    if text.lower() in RESUME_LAST:
        return "last"
    return text


def check_training_sizes(args: Any) -> None:
    """The transformers numbers that would fail only once training runs (a ZeroDivisionError in the
    step count, a batch sampler of size 0, an optimizer refusing a negative rate), and run lengths that would
    train nothing, checked for SFT, GRPO and the RM before anything is loaded."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    lr = args.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:  # `not >=` also catches NaN
        raise ConfigError(f"learning_rate must be a number >= 0, got {lr!r}")
    # transformers reads max_steps > 0 as the run's length and anything else as "use num_train_epochs": 0 ran one
    # step, and -5 or num_train_epochs 0 trained nothing, wrote the input model back and reported success
    steps, epochs = args.max_steps, args.num_train_epochs
    if isinstance(steps, bool) or not isinstance(steps, int) or (steps < 1 and steps != -1):
        raise ConfigError(f"max_steps must be an integer >= 1, or -1 to train for num_train_epochs, got {steps!r}")
    if steps == -1 and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0):
        raise ConfigError(f"num_train_epochs must be > 0 when max_steps is -1, got {epochs!r}")
    check_lr_scheduler(args.lr_scheduler_type, args.lr_scheduler_kwargs)


def check_lr_scheduler(name: Any, kwargs: Any) -> None:
    """Builds the schedule once on a throw-away optimizer, as Trainer will (transformers' `get_scheduler`): a
    misspelt `lr_scheduler_kwargs` key, or one the schedule needs, failed only after the model was loaded."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10,
                      scheduler_specific_kwargs=dict(kwargs or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"lr_scheduler_type {getattr(name, 'value', name)!r} with lr_scheduler_kwargs "
                          f"{dict(kwargs or {})}: {e}") from None


def _known_integrations() -> list[str]:
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # another transformers layout: let transformers judge the names
        return []
    return list(INTEGRATION_TO_CALLBACK)


def sync_each_batch_under_fsdp(args: Any) -> None:
    """Under FSDP, gradient accumulation reduce-scatters every micro-batch (accelerate's `sync_each_batch`),
    unless the recipe's `accelerator_config` says otherwise. Trainer otherwise runs every micro-batch but the
    last in accelerate's `no_sync`, which under FSDP2 is `set_requires_gradient_sync(False)`: each GPU keeps
    every layer's *unsharded* gradient until the last micro-batch -- the whole model's gradients per GPU
    (1.3 TB in bf16 for V3 671B) where the plan counts 1/world of them. Called before transformers'
    `__post_init__` (which turns `accelerator_config` into an `AcceleratorConfig`)."""
    import os

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(getattr(args, "fsdp", None))
    config = args.accelerator_config
    if not fsdp or not (config is None or isinstance(config, dict)):
        return  # not sharded, or a config file / AcceleratorConfig the user built: theirs as given
    config = dict(config or {})
    kwargs = dict(config.get("gradient_accumulation_kwargs") or {})
    kwargs.setdefault("sync_each_batch", True)
    config["gradient_accumulation_kwargs"] = kwargs
    args.accelerator_config = config


def apply_process_defaults(args: Any, mtp_module_unused: bool) -> None:
    """Called from the recipe configs' `__post_init__`, before transformers' own."""
    import torch

    args.report_to = normalize_report_to(args.report_to)
    sync_each_batch_under_fsdp(args)
    from engines.compat import prefer_regional_compilation

    prefer_regional_compilation(args)  # torch_compile: each decoder block, not all layers unrolled into one graph
    if not torch.cuda.is_available():
        # Without it transformers sets up no process group on a CPU-only machine, and
        # `accelerate launch --num_processes 2` would run two independent single-process jobs.
        args.use_cpu = True
    if args.ddp_find_unused_parameters is None:
        # When the MTP module is trained every parameter takes part (routed experts are fused
        # tensors) and DDP's unused-parameter search is wasted work; it would also trip over the
        # output head, which the main and MTP heads share. With λ = 0 the MTP module is unused.
        args.ddp_find_unused_parameters = mtp_module_unused


@dataclass
class RunDirFields:
    """How a run treats its output_dir, declared once for SFT, GRPO and the reward model (mixed into each
    recipe config before the TRL config it extends)."""

    resume_from_checkpoint: str | None = field(default=None, metadata={"help": RESUME_HELP})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output_dir that holds an earlier run (its checkpoint-N directories are "
                  "deleted first, so that a later resume cannot pick one up). Without it such a start is refused: "
                  "resume with --resume_from_checkpoint true, or choose another output_dir."},
    )


@dataclass
class V3TrainingFields:
    """The DeepSeek-V3 training fields SFT and GRPO share, declared once (mixed into both recipe
    configs). `mtp_loss_weight` and `seq_balance_alpha` stay with each stage: GRPO's λ may be
    `auto` and its rows are single samples, SFT's λ has a schedule and its rows are packed."""

    mtp_detach_input: bool = field(
        default=False,
        metadata={"help": "Stop the MTP loss's gradient at the main model's hidden states (train the MTP module "
                  "only through its own weights)."},
    )
    bias_update_speed: float = field(
        default=1e-3,
        metadata={"help": "γ of the aux-loss-free balancing (V3 report §2.1.2): after each optimizer step every "
                  "router's e_score_correction_bias moves by γ·sign(mean load − load). 0 freezes the biases."},
    )
    fp8: bool = field(
        default=False,
        metadata={"help": "FP8 training (V3 report §3.3): attention projections, dense MLP, shared and routed experts "
                  "(MTP block included) compute in block-scaled e4m3 (1x128 activation tiles, 128x128 weight "
                  "blocks, fp32 accumulation); embeddings, lm_head, router, norms stay high precision and master "
                  "weights keep the model dtype. CPU runs the reference (emulated) FP8 GEMM. Independent of it, an "
                  "FP8 model_name_or_path (DeepSeek's block-FP8 checkpoint) is trained from dequantized master "
                  "weights and exported as FP8 again."},
    )
    fp8_backward: str = field(
        default="fp8",
        metadata={"help": "With fp8: 'fp8' quantizes the two backward GEMMs too (report Figure 7); 'bf16' runs "
                  "them in the activation dtype.", "choices": ["fp8", "bf16"]},
    )
    fp8_bf16_moments: bool = field(
        default=False,
        metadata={"help": "AdamW keeps its first and second moments in bf16 (report §3.3.3); needs an AdamW optim."},
    )


def check_mtp_loss_weight(value: Any, *, allow_auto: bool = False, field_name: str = "mtp_loss_weight") -> float | str:
    """The one check of an MTP loss weight λ (SFT, GRPO): a number >= 0, or `auto` where the stage
    has the closed loop. Returns the normalised value; the same ConfigError everywhere otherwise."""
    original = value
    if isinstance(value, str):
        text = value.strip().lower()
        if allow_auto and text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        expected = "a number >= 0 or 'auto'" if allow_auto else "a number >= 0"
        raise ConfigError(f"{field_name} must be {expected}, got {original!r}")
    return float(value)
