"""`dsv3-posttrain grpo`: build the data, rewards, engine and trainer from a recipe, train, save."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from engines import RolloutEngine
from engines.hf import HFGenerateEngine

from ..errors import UserError
from ..fp8.training import apply_fp8_training, finalize_fp8_export, is_fp8_checkpoint, load_pretrained
from ..modeling import DeepseekV3ForCausalLMWithMTP
from .config import GRPORecipeConfig, check_reward_weights

log = logging.getLogger(__name__)

def load_prompts(cfg: GRPORecipeConfig):
    """The prompt dataset with a `prompt` column and, when present, `answer`; clear errors otherwise
    (naming the file line, as SFT and distill do, for rows read from a local file).

    TRL reads the prompt from `prompt` and passes every other column to the rewards under its own name. So
    `prompt_column` and `answer_column` add `prompt` and `answer` as copies and keep the user's columns; with
    `answer_column` left at `answer`, a dataset that has TRL's `solution` instead gives that as `answer`."""
    from rewards import gold_column

    from data_pipelines.loading import answer_problem, load_rows, prompt_problem, require_columns, row_location

    ds = load_rows(cfg.dataset_name, cfg.dataset_split)
    if len(ds) == 0:
        raise UserError(f"{cfg.dataset_name} ({cfg.dataset_split}): the dataset is empty")
    require_columns(ds, [cfg.prompt_column], cfg.dataset_name)
    answer_source = cfg.answer_column
    if answer_source == "answer" and "answer" not in ds.column_names and "solution" in ds.column_names:
        answer_source = "solution"  # TRL's accuracy_reward column
    # the columns the rewards score against (math_accuracy's gold_column: `answer` unless its spec names another)
    golds = [gold_column(spec) for spec in cfg.reward_funcs]
    needed = sorted({answer_source if g == "answer" else g for g in golds if g})
    require_columns(ds, needed, cfg.dataset_name)
    n_used = len(ds) if cfg.max_prompts is None else min(cfg.max_prompts, len(ds))  # rows past it are not used
    # every row used (one column read): a blank prompt at row 10,001 trained as an empty prompt
    for i, prompt in enumerate(ds.select_columns([cfg.prompt_column]).select(range(n_used))[cfg.prompt_column]):
        problem = prompt_problem(prompt)
        if problem:
            raise UserError(f"{row_location(ds, i, cfg.dataset_name)}: {problem} (column {cfg.prompt_column!r})")
    if all(golds):
        # Every reward needs a gold answer: a row without one is scored None by all of them and trains on
        # nothing (TRL only warns). With other rewards too (math and code rows in one set) None is the
        # reward's "not mine" and the row is theirs. One column read, so every used row is checked.
        for column in needed:
            for i, answer in enumerate(ds.select_columns([column]).select(range(n_used))[column]):
                problem = answer_problem(answer)
                if problem:
                    reward = cfg.reward_funcs[0] if len(cfg.reward_funcs) == 1 else "every reward"
                    raise UserError(f"{row_location(ds, i, cfg.dataset_name)}: {problem} (column {column!r}); "
                                    f"{reward} needs a gold answer for every prompt")
    if cfg.max_prompts is not None:
        ds = ds.select(range(n_used))
    ds = _copy_column(ds, cfg.prompt_column, "prompt", "prompt_column", cfg.dataset_name)
    if answer_source in ds.column_names:
        ds = _copy_column(ds, answer_source, "answer", "answer_column", cfg.dataset_name)
    return ds


def _copy_column(ds, source: str, name: str, field: str, dataset: str):
    """`ds` with column `source` also under `name`, the name TRL or the built-in rewards read."""
    if source == name:
        return ds
    if name in ds.column_names:
        raise UserError(f"{dataset}: {field} is {source!r}, but the dataset also has a column {name!r}, which is the "
                        f"one read as the {name}; drop or rename one of them, or set {field}: {name}")
    return ds.add_column(name, ds[source])


def check_server_mode(cfg: GRPORecipeConfig) -> None:
    """What `vllm_mode: server` cannot do, said before anything is loaded."""
    if not (cfg.use_vllm and cfg.vllm_mode == "server"):
        return
    if is_fp8_checkpoint(cfg.model_name_or_path):
        # TRL's client sends one tensor at a time, which vLLM's block-FP8 layers cannot take after
        # loading, and high-precision weights must not be cast into FP8 parameters without their scales
        raise UserError(f"{cfg.model_name_or_path} is an FP8 checkpoint: weight sync to a vLLM server cannot send "
                        "FP8 weights; use vllm_mode: colocate, or train from a bf16 conversion "
                        "(dsv3-posttrain convert fp8-to-bf16)")
    if not torch.cuda.is_available():
        raise UserError("vllm_mode: server pushes the weights to the server over NCCL, which needs CUDA; on CPU "
                        "use vllm_mode: colocate")


def check_speculative_rollouts(cfg: GRPORecipeConfig, model_config=None) -> None:
    """What `rollout_speculative_tokens > 0` cannot run with, said in one line before anything heavy."""
    k = cfg.rollout_speculative_tokens
    if not k:
        return
    if not cfg.use_vllm:
        raise UserError(f"rollout_speculative_tokens={k} drafts with vLLM's MTP speculative decoding: it needs "
                        "use_vllm: true (vllm_mode: colocate)")
    if cfg.vllm_mode == "server":
        raise UserError(f"rollout_speculative_tokens={k}: a vLLM server's MTP drafter is not updated by the weight "
                        "sync (it would draft with stale weights); use vllm_mode: colocate, or 0")
    if model_config is not None and not int(getattr(model_config, "num_nextn_predict_layers", 0) or 0):
        raise UserError(f"rollout_speculative_tokens={k}: {cfg.model_name_or_path} has no MTP module "
                        "(num_nextn_predict_layers=0) to draft with")


def build_engine(cfg: GRPORecipeConfig, model, tokenizer) -> RolloutEngine:
    """The rollout engine the recipe asks for: vLLM colocated (default), a vLLM server, or HF generate."""
    check_speculative_rollouts(cfg, model.config)
    if not cfg.use_vllm:
        return HFGenerateEngine(model, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    from engines.vllm_engine import VLLMColocateEngine, VLLMServerEngine

    if cfg.vllm_mode == "server":
        check_server_mode(cfg)
        base = cfg.vllm_server_base_url or f"http://{cfg.vllm_server_host}:{cfg.vllm_server_port}"
        return VLLMServerEngine(base, connection_timeout=cfg.vllm_server_timeout, group_port=cfg.vllm_group_port,
                                eos_token_ids=[tokenizer.eos_token_id])  # finish reasons: the server returns none
    max_len = cfg.vllm_max_model_length or min(model.config.max_position_embeddings, 4096)
    try:
        return VLLMColocateEngine(
            cfg.model_name_or_path,
            dtype=cfg.vllm_dtype,
            max_model_len=max_len,
            seed=cfg.seed,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            speculative_tokens=cfg.rollout_speculative_tokens,
        )
    except ValueError as e:  # what the engine refuses to speculate with (e.g. an FP8-served checkpoint)
        if str(e).startswith("rollout_speculative_tokens="):
            raise UserError(str(e)) from None
        raise


def build_trainer(cfg: GRPORecipeConfig, engine: RolloutEngine | None = None, model=None, train_dataset=None):
    from rewards import RewardSuite

    from ..tokenizer import load_checkpoint_tokenizer
    from .trainer import V3GRPOTrainer

    from ..recipe import require_model_dir
    from ..trainer_args import check_reporting_installed

    require_model_dir(cfg.model_name_or_path, required_hint="a checkpoint directory, e.g. from `dsv3-posttrain sft`")
    check_reporting_installed(cfg)
    if engine is None:
        check_server_mode(cfg)
        check_speculative_rollouts(cfg)
    if train_dataset is None:
        train_dataset = load_prompts(cfg)  # before the model: a bad row is reported in seconds, whatever the model size
    check_reward_weights(cfg.reward_funcs, cfg.reward_weights)  # again: a caller may have changed either list
    weights = cfg.reward_weights if cfg.reward_weights is not None else [1.0] * len(cfg.reward_funcs)
    # before the policy: a misspelt reward name or a broken reward file is reported before a model is loaded
    suite = RewardSuite(list(zip(cfg.reward_funcs, weights, strict=True)),
                        policy=cfg.reward_failure_policy, timeout_s=cfg.reward_timeout_s)
    if cfg.reward_weights is None:
        cfg.reward_weights = list(suite.weights)
    tokenizer = load_checkpoint_tokenizer(cfg.model_name_or_path)
    if model is None:
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        model = load_pretrained(DeepseekV3ForCausalLMWithMTP, cfg.model_name_or_path, dtype=dtype)  # FP8 too
    if engine is None:
        engine = build_engine(cfg, model, tokenizer)
    trainer = V3GRPOTrainer(
        model=model,
        args=cfg,
        engine=engine,
        reward_funcs=suite.trl_reward_funcs(),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    apply_fp8_training(trainer, cfg)  # `fp8: true` layers, bf16 AdamW moments (V3 report §3.3)
    return trainer


def run_grpo(cfg: GRPORecipeConfig, trainer=None) -> dict[str, Any]:
    """Trains, saves the final checkpoint (DeepSeek layout, loadable by transformers and vLLM) and
    returns the last logged metrics. Resumes from the newest checkpoint in `output_dir` when
    `resume_from_checkpoint` is true or a path. `trainer` may be one made by `build_trainer(cfg)`
    (e.g. with callbacks attached)."""
    if trainer is None:
        trainer = build_trainer(cfg)
    resume = trainer.resolve_resume(cfg.resume_from_checkpoint)
    try:
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(cfg.output_dir)  # every rank takes part (FSDP gathers); rank 0 writes
        finalize_fp8_export(trainer.model, cfg.output_dir, main_process=trainer.is_world_process_zero())
    finally:
        trainer.engine.close()
    history = [h for h in trainer.state.log_history if "reward" in h]
    summary = {"steps": trainer.state.global_step, "last": history[-1] if history else {}}
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(cfg.output_dir)
        trainer.state.save_to_json(os.path.join(cfg.output_dir, "trainer_state.json"))
        Path(cfg.output_dir, "grpo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
