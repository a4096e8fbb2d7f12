"""`run_rm_training(cfg)`: the `dsv3-posttrain rm train` entry point — pairs → TRL RewardTrainer → RM.

DeepSeek-V3 report §5.2.1 ("Model-Based RM"): the reward model is trained from a V3 SFT checkpoint
on preference data whose responses may carry the chain-of-thought leading to the answer. Here:
V3 backbone + scalar head (model.py), Bradley–Terry loss −log σ(r_chosen − r_rejected) (TRL's
`RewardTrainer`; with a `margin` column −log σ(r_c − r_r − margin)), fp32 on CPU. At the end the
held-out pairwise accuracy (share of pairs whose chosen response scores higher) is measured with
the same scorer GRPO uses (`rewards.reward_model.RewardModelScorer`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UserError
from .config import RMRecipeConfig
from .data import load_preference_rows, to_preference_examples
from .model import load_reward_backbone, load_tokenizer

log = logging.getLogger(__name__)

SUMMARY_FILE = "rm_summary.json"
DEFAULT_BUILTIN_PAIRS = 3200


def _check(cfg: RMRecipeConfig) -> None:
    from ..recipe import require_model_dir

    require_model_dir(cfg.model_name_or_path, allow_hub=True,
                      required_hint="e.g. runs/sft-tiny, or runs/tiny-model from `dsv3-posttrain init-model`")
    if not cfg.output_dir:
        raise ConfigError("output_dir is required")
    from ..trainer_args import check_reporting_installed

    check_reporting_installed(cfg)


def load_pairs(name: str, split: str, limit: int | None, cfg: RMRecipeConfig) -> list[dict[str, Any]]:
    """Preference examples (TRL conversational form) of one split, at most `limit`."""
    rows = load_preference_rows(name, split, dataset_config=cfg.dataset_config,
                                n_builtin=limit or DEFAULT_BUILTIN_PAIRS)
    if limit is not None:
        rows = rows[:limit]
    return to_preference_examples(rows, source=f"{name} ({split})")


def pairwise_accuracy(scorer, examples: list[dict[str, Any]]) -> dict[str, float]:
    """Share of pairs with score(chosen) > score(rejected), and the mean score margin."""
    prompts = [e["prompt"] for e in examples]
    chosen = scorer(prompts, [e["chosen"] for e in examples])
    rejected = scorer(prompts, [e["rejected"] for e in examples])
    wins = [c > r for c, r in zip(chosen, rejected)]
    return {
        "accuracy": sum(wins) / len(wins),
        "margin": sum(c - r for c, r in zip(chosen, rejected)) / len(wins),
        "pairs": float(len(wins)),
    }


def run_rm_training(cfg: RMRecipeConfig) -> dict[str, Any]:
    """Trains the reward model described by `cfg`; returns (and writes to `output_dir/rm_summary.json`)
    the run summary: steps, loss, pairs used/dropped, held-out accuracy and margin."""
    import torch

    threads = torch.get_num_threads()
    if cfg.torch_num_threads:
        torch.set_num_threads(cfg.torch_num_threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: RMRecipeConfig) -> dict[str, Any]:
    from datasets import Dataset
    from rewards.reward_model import RewardModelScorer
    from transformers import set_seed

    from .trainer import V3RewardTrainer

    _check(cfg)
    # The scalar head is new (model.py) and drawn from torch's global generator when the backbone
    # loads, before Trainer seeds anything: without this, `seed` does not make a run repeatable.
    set_seed(cfg.seed)
    t0 = time.time()
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    train = load_pairs(cfg.dataset_name, cfg.dataset_train_split, cfg.max_train_samples, cfg)
    held_out = None
    eval_source = cfg.effective_eval_dataset()
    if eval_source is not None:
        held_out = load_pairs(eval_source[0], eval_source[1], cfg.max_eval_samples, cfg)

    eval_strategy = str(getattr(cfg.eval_strategy, "value", cfg.eval_strategy))
    periodic_eval = eval_strategy != "no"
    if periodic_eval and not held_out:
        raise ConfigError(f"eval_strategy={eval_strategy!r} evaluates on held-out pairs, and this run has none: "
                          "set eval_dataset_name (and max_eval_samples > 0), or eval_strategy: no")

    model = load_reward_backbone(cfg.model_name_or_path, tokenizer, **cfg.model_kwargs())
    # Trainer refuses an eval_strategy without an eval_dataset; the held-out pairs serve both the
    # periodic evaluation (TRL's eval_accuracy / eval_margin) and the final one below.
    trainer = V3RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(train),
                            eval_dataset=Dataset.from_list(held_out) if periodic_eval else None,
                            processing_class=tokenizer)
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise UserError(f"{cfg.dataset_name}: every pair is longer than max_length={cfg.max_length} tokens")
    if kept < len(train):
        log.warning("%d of %d pairs are longer than max_length=%s tokens and were dropped",
                    len(train) - kept, len(train), cfg.max_length)
    result = trainer.train(resume_from_checkpoint=trainer.resolve_resume(cfg.resume_from_checkpoint))

    summary: dict[str, Any] = {
        "output_dir": str(cfg.output_dir),
        "model_name_or_path": cfg.model_name_or_path,
        "dataset_name": cfg.dataset_name,
        "train_pairs": kept,
        "dropped_too_long": len(train) - kept,
        "global_step": result.global_step,
        "train_loss": result.training_loss,
    }
    logged = [h for h in trainer.state.log_history if "accuracy" in h]
    if logged:
        summary["last_train_accuracy"] = logged[-1]["accuracy"]
    trainer.model.eval()
    if held_out:
        scorer = RewardModelScorer.from_model(trainer.model, tokenizer, batch_size=cfg.per_device_eval_batch_size)
        # the pairs TRL's own evaluation (eval_accuracy, eval_margin) uses: those whose both sides fit max_length
        # (the scorer would shorten a longer row, and the same metric names then meant other pairs)
        fitting = held_out if cfg.max_length is None else [
            e for e in held_out if max(len(scorer.encode(e["prompt"], e[side])) for side in ("chosen", "rejected"))
            <= cfg.max_length]
        if not fitting:
            raise UserError(f"{eval_source[0]} ({eval_source[1]}): every held-out pair is longer than "
                            f"max_length={cfg.max_length} tokens")
        if len(fitting) < len(held_out):
            log.warning("%d of %d held-out pairs are longer than max_length=%s tokens and were dropped, as TRL's "
                        "evaluation drops them", len(held_out) - len(fitting), len(held_out), cfg.max_length)
        ev = pairwise_accuracy(scorer, fitting)
        summary.update({"eval_dataset": f"{eval_source[0]} ({eval_source[1]})", "eval_pairs": int(ev["pairs"]),
                        "eval_pairs_dropped_too_long": len(held_out) - len(fitting),
                        "eval_accuracy": ev["accuracy"], "eval_margin": ev["margin"]})
        log.info("held-out pairwise accuracy %.3f on %d pairs (mean margin %.3f)", ev["accuracy"],
                 int(ev["pairs"]), ev["margin"])
    if cfg.save_final_model:
        out = Path(cfg.output_dir)
        trainer.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    summary["runtime_s"] = round(time.time() - t0, 1)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
