"""`run_sft(cfg)`: the `dsv3-posttrain sft` entry point — data → packed rows → trainer → checkpoint."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fp8.training import apply_fp8_training, load_pretrained
from ..modeling import DeepseekV3ForCausalLMWithMTP
from .config import SFTRecipeConfig
from .data import tokenize_dataset
from .export import export_trained_model
from .packing import PackedCollator, pack_samples
from .trainer import DeepseekV3SFTTrainer, make_balancer

log = logging.getLogger(__name__)

SUMMARY_FILE = "sft_summary.json"
EXPERT_LOAD_PLOT = "expert_load.png"


def load_model(cfg: SFTRecipeConfig) -> DeepseekV3ForCausalLMWithMTP:
    """The V3 model with its MTP module(s), from the DeepSeek layout."""
    return load_pretrained(DeepseekV3ForCausalLMWithMTP, cfg.model_name_or_path, **cfg.model_kwargs())  # FP8 too


def load_tokenizer(cfg: SFTRecipeConfig):
    from ..tokenizer import load_checkpoint_tokenizer

    return load_checkpoint_tokenizer(cfg.model_name_or_path)  # pad tokens are never targets, in their own segment


def build_train_dataset(cfg: SFTRecipeConfig, tokenizer, split: str | None = None):
    """Rows (load_rows) → tokenized samples → BFD-packed rows. Returns (dataset, data stats dict)."""
    from data_pipelines.loading import bad_rows_in_use, first_rows, load_rows

    split = split or cfg.dataset_train_split
    source = f"{cfg.dataset_name} ({split})"
    # with on_bad_row: skip, rows the loader cannot read (invalid JSON, a value of another type) are
    # dropped and counted like the rows tokenize_dataset finds malformed
    bad: list[dict[str, str]] = []
    rows = load_rows(cfg.dataset_name, split, dataset_config=cfg.dataset_config,
                     bad_rows=bad if cfg.on_bad_row == "skip" else None)
    if cfg.max_train_samples is not None and split == cfg.dataset_train_split:
        n_used = min(cfg.max_train_samples, len(rows))
        bad = bad_rows_in_use(bad, rows, n_used, source)  # not those past the rows used
        rows = first_rows(rows, n_used)  # its bad rows still named by file line
    samples, stats = tokenize_dataset(
        rows,
        tokenizer,
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        on_bad_row=cfg.on_bad_row,
        assistant_only_loss=cfg.assistant_only_loss,
        completion_only_loss=cfg.completion_only_loss,
        source=source,
        skipped_rows=bad,
    )
    info = stats.as_dict()
    if cfg.packing:
        packed = pack_samples(samples, cfg.max_length, cfg.dataset_num_proc)
        info["packed_rows"] = len(packed)
        info["pack_fill"] = stats.tokens / (len(packed) * cfg.max_length)
        return packed, info
    info["packed_rows"] = None
    return samples, info


def _check(cfg: SFTRecipeConfig) -> None:
    from ..recipe import require_model_dir

    require_model_dir(cfg.model_name_or_path, required_hint="e.g. runs/tiny-model from `dsv3-posttrain init-model`",
                      allow_hub=True)
    if not cfg.dataset_name:
        raise ConfigError("dataset_name is required (a distill output directory, a .jsonl/.parquet file or a Hub id)")
    if not cfg.output_dir:
        raise ConfigError("output_dir is required")
    if cfg.dataset_test_split and cfg.eval_strategy != "no" and Path(cfg.dataset_name).expanduser().is_file():
        # a single file is every split to the loader: the evaluation ran on the training rows
        raise ConfigError(f"dataset_test_split {cfg.dataset_test_split!r}: {cfg.dataset_name} is a single file, whose "
                          "rows are the training split; give a directory with a file per split (train.jsonl, "
                          "test.jsonl) to evaluate on held-out rows")
    from ..trainer_args import check_reporting_installed

    check_reporting_installed(cfg)


def build_trainer(cfg: SFTRecipeConfig) -> DeepseekV3SFTTrainer:
    """Data (load → tokenize → pack), model (+ LoRA), balancer and collator, wired into the trainer.
    The data statistics are on `trainer.data_info`."""
    from transformers import set_seed

    _check(cfg)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg)
    train_dataset, data_info = build_train_dataset(cfg, tokenizer)
    log.info("SFT data: %s", {k: v for k, v in data_info.items() if k != "bad_examples"})
    eval_dataset = None
    if cfg.dataset_test_split and cfg.eval_strategy != "no":
        eval_dataset, eval_info = build_train_dataset(cfg, tokenizer, cfg.dataset_test_split)
        data_info["eval"] = eval_info

    model = load_model(cfg)
    if cfg.use_lora:
        from .lora import apply_lora

        model = apply_lora(model, cfg)
    balancer = make_balancer(model, cfg)
    collator = PackedCollator(
        pad_token_id=tokenizer.pad_token_id,
        padding_free=cfg.resolved_padding_free(),
        pad_to_multiple_of=cfg.resolved_pad_to_multiple_of(),
    )
    trainer = DeepseekV3SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        balancer=balancer,
        expert_load_plot=out / EXPERT_LOAD_PLOT if cfg.balance_history_interval > 0 else None,
    )
    trainer.data_info = data_info
    apply_fp8_training(trainer, cfg)  # `fp8: true` layers, bf16 AdamW moments (report §3.3)
    return trainer


def run_sft(cfg: SFTRecipeConfig, trainer: DeepseekV3SFTTrainer | None = None) -> dict[str, Any]:
    """Trains and (with `save_final_model`) writes model + tokenizer + `trainer_state.json` +
    `expert_load.png` + `sft_summary.json` to `cfg.output_dir`. Returns the summary.

    `trainer` may be one made by `build_trainer(cfg)` (to keep a handle on the in-memory model)."""
    started = time.time()
    if trainer is None:
        trainer = build_trainer(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = trainer.train(resume_from_checkpoint=trainer.resolve_resume(cfg.resume_from_checkpoint))
    trainer.save_state()  # trainer_state.json (log_history) in output_dir

    model_dir = None
    if cfg.save_final_model:
        exported = export_trained_model(trainer, out)  # every rank takes part (FSDP gathers); rank 0 writes
        model_dir = str(exported) if exported is not None else None
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    balancer = trainer.balancer
    summary = {
        "output_dir": str(out),
        "model_dir": model_dir,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_log": train_logs[0] if train_logs else None,
        "last_log": train_logs[-1] if train_logs else None,
        "data": getattr(trainer, "data_info", None),
        "moe_bias_abs_max": float(balancer.biases().abs().max()) if balancer is not None else None,
        "expert_load_plot": str(out / EXPERT_LOAD_PLOT) if (out / EXPERT_LOAD_PLOT).exists() else None,
        "wall_seconds": round(time.time() - started, 1),
        "train_runtime": result.metrics.get("train_runtime"),
    }
    if trainer.is_world_process_zero():
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
