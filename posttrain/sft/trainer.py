"""The SFT trainer: next-token loss + λ·MTP loss (report §2.2) + sequence-wise balance loss, with
aux-loss-free bias updates after every optimizer step (§2.1.2), on sample-masked packed rows (§5.2).

Why `transformers.Trainer` and not TRL's `SFTTrainer` (TRL 1.16.0): SFTTrainer prepares the data
itself and rejects what this pipeline hands it — a pre-tokenized, pre-packed dataset with
`assistant_only_loss=True` fails its "conversational dataset" check, and `packing=True` with BFD
forbids a custom collator — and it patches `model.forward` with a fused LM head that runs only the
backbone, so the MTP module would never run; its `compute_loss` would be replaced wholesale anyway.
So the config is TRL's (`SFTRecipeConfig` extends `SFTConfig`), the packing engine is TRL's
(`pack_dataset(strategy="bfd")`), and the loop is transformers' Trainer, customised through its
public hooks: `compute_loss`, `log`, callbacks — and, through `DeepSeekLayoutCheckpoints`, the
private `_load_from_checkpoint` (transformers 5.19; see there why).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer

from ..balancing import BALANCER_STATE_FILE, BalancingCallback, ExpertLoadBalancer
from ..checkpoints import DeepSeekLayoutCheckpoints
from ..compat import apply_training_patches
from ..distributed import check_launch
from ..modeling import sample_ids_from_positions, unwrap_model
from .config import SFTRecipeConfig

log = logging.getLogger(__name__)

# The run's token count as of a checkpoint (the logged `num_tokens`), beside the balancer's state
TOKENS_STATE_FILE = "sft_progress.json"

class DeepseekV3SFTTrainer(DeepSeekLayoutCheckpoints, Trainer):
    """transformers `Trainer` for DeepSeek-V3 SFT with MTP and routing balance.

    Args beyond `Trainer`'s: `balancer` (an `ExpertLoadBalancer` on the model, or None to train
    without balancing) and `expert_load_plot` (PNG path for the end-of-training heatmap).
    """

    def __init__(
        self,
        *args,
        balancer: ExpertLoadBalancer | None = None,
        expert_load_plot: str | Path | None = None,
        **kwargs,
    ):
        apply_training_patches()  # before accelerator.prepare (FSDP2 loading)
        super().__init__(*args, **kwargs)
        check_launch(self.accelerator.num_processes, self.accelerator.distributed_type)
        if not isinstance(self.args, SFTRecipeConfig):
            raise TypeError("DeepseekV3SFTTrainer needs an SFTRecipeConfig")
        # compute_loss normalises over the whole accumulated batch itself (num_items_in_batch).
        self.loss_is_scaled_for_ga = True
        self.balancer = balancer
        self._metrics: dict[str, list[torch.Tensor | float]] = defaultdict(list)
        self._tokens_since_log = 0  # this rank's, since the last log
        self._total_tokens = 0  # all ranks', up to the last log (restored on resume)
        self._tokens_at_save = 0
        self._last_log_time: float | None = None
        if balancer is not None:
            cb = BalancingCallback(balancer, expert_load_plot)
            cb.on_metrics = lambda m: [self._metrics[k].append(v) for k, v in m.items()]
            self.add_callback(cb)

    # -- loss ------------------------------------------------------------------------------------
    def current_mtp_weight(self) -> float:
        return self.args.mtp_weight_at(self.state.global_step, self.state.max_steps or 0)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        # the collator's extras for the trainer, not model inputs
        token_mask = inputs.pop("token_mask", None)
        n_tokens = inputs.pop("num_tokens", None)
        if "attention_mask" in inputs and "position_ids" in inputs:
            # An attention mask makes transformers ignore the position restarts: samples would leak.
            raise ValueError("packed batches must not carry an attention_mask")
        labels = inputs["labels"]
        position_ids = inputs.get("position_ids")
        training = model.training
        base = unwrap_model(model)
        lam = self.current_mtp_weight()
        has_mtp = bool(getattr(base, "mtp_layers", None))
        compute_mtp = has_mtp and lam > 0

        if self.balancer is not None and training:
            sample_ids = sample_ids_from_positions(position_ids) if position_ids is not None else None
            scope = self.balancer.batch(token_mask=token_mask, sample_ids=sample_ids)
        else:
            scope = contextlib.nullcontext()
        # Chunked LM head + CE (no [tokens, vocab] logits) whenever nobody reads the logits: in
        # training, and in evaluation that keeps losses only (Trainer.prediction_step).
        return_logits = not (self.args.chunked_lm_loss and (training or self.args.prediction_loss_only))
        n_valid = (labels[..., 1:] != -100).sum()
        with scope:
            out = model(
                **inputs,
                use_cache=False,  # with a cache transformers skips packed-sequence masking
                compute_mtp=compute_mtp,
                detach_mtp_input=self.args.mtp_detach_input,
                return_logits=return_logits,
                lm_loss_backend=self.args.lm_loss_backend,
                # report eq. 24: the MTP sums over 1/T, T the main loss's targets, so the one rescale below makes
                # both token-weighted over the accumulated batch (a depth has fewer targets than the main head
                # when the loss covers whole samples: its mean would weigh micro-batches differently)
                mtp_num_items=n_valid if compute_mtp else None,
            )
            balance_loss = self.balancer.sequence_balance_loss() if (self.balancer is not None and training) else None

        # `out.loss` is the mean over this micro-batch's targets; rescale to a share of the whole
        # accumulated batch so that gradient accumulation gives the token-weighted mean exactly.
        if num_items_in_batch is not None and training:
            scale = n_valid / torch.as_tensor(num_items_in_batch, device=n_valid.device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                scale = scale * self.accelerator.num_processes  # DDP averages the gradients across ranks
            per_micro = 1.0
        else:
            scale = 1.0
            per_micro = 1.0 / self.current_gradient_accumulation_steps if training else 1.0
        lm_loss = out.loss
        objective = lm_loss
        if compute_mtp and out.mtp_loss is not None:
            objective = objective + lam * out.mtp_loss
        loss = objective * scale * per_micro
        if balance_loss is not None:
            # a per-micro-batch mean: average it over the accumulation steps
            loss = loss + balance_loss / self.current_gradient_accumulation_steps

        mode = "train" if training else "eval"
        prefix = "" if training else "eval_"
        # (sum, weight): both losses are means over this micro-batch's main-head targets, logged token-weighted
        # as the optimised loss is (a mean of micro-batch means moved with the batch split)
        self._metrics[f"{prefix}lm_loss"].append((lm_loss.detach() * n_valid, n_valid))
        if out.mtp_loss is not None:
            self._metrics[f"{prefix}mtp_loss"].append((out.mtp_loss.detach() * n_valid, n_valid))
        if mode == "train":
            self._metrics["mtp_loss_weight"].append(lam if compute_mtp else 0.0)
            if balance_loss is not None:
                self._metrics["moe/seq_balance_loss"].append(balance_loss.detach())
            if n_tokens is None:
                n_tokens = int(inputs["input_ids"].numel())
            self._tokens_since_log += int(n_tokens)
            if self._last_log_time is None:
                self._last_log_time = time.perf_counter()
        return (loss, out) if return_outputs else loss

    # -- logging ---------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every rank calls it (Trainer does). The metrics are means over every rank's micro-batches (the losses
        weighted by their target tokens) and the token counts sums over the ranks, as Trainer's `loss` and TRL's
        metrics are: one all-reduce per log."""
        is_eval = any(k.startswith("eval_") for k in logs)
        keys = sorted(k for k, v in self._metrics.items() if is_eval == k.startswith("eval_") and v)
        train_log = "loss" in logs and not is_eval
        device = self.accelerator.device
        # [sum of each metric, count of each metric, tokens since the last log]
        stats = torch.zeros(2 * len(keys) + 1, dtype=torch.float64, device=device)
        for i, k in enumerate(keys):  # an entry is a value, or (weighted sum, weight)
            pairs = [v if isinstance(v, tuple) else (v, 1.0) for v in self._metrics[k]]
            stats[i] = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v, _ in pairs]).sum()
            stats[len(keys) + i] = torch.stack([torch.as_tensor(w, dtype=torch.float64).to(device) for _, w in pairs]).sum()
            self._metrics[k] = []
        stats[-1] = self._tokens_since_log
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, "sum")
        values = stats.tolist()  # one device sync per log, not per micro-batch
        metrics = {k: values[i] / values[len(keys) + i] for i, k in enumerate(keys)}
        if train_log:
            now = time.perf_counter()
            tokens_since_log = int(values[-1])
            if self._last_log_time is not None and now > self._last_log_time:
                metrics["train/tokens_per_second"] = tokens_since_log / (now - self._last_log_time)
            self._total_tokens += tokens_since_log
            metrics["num_tokens"] = float(self._total_tokens)
            self._tokens_since_log = 0
            self._last_log_time = now
        logs.update(metrics)
        super().log(logs, start_time)

    # -- resume ----------------------------------------------------------------------------------
    def checkpoint_state_files(self) -> list[str]:
        return [BALANCER_STATE_FILE] if self.balancer is not None else []

    def _save_checkpoint(self, model, trial) -> None:
        # every rank: the run's token count as of this step, all ranks' tokens since the last log included
        pending = torch.tensor([float(self._tokens_since_log)], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            pending = self.accelerator.reduce(pending, "sum")
        self._tokens_at_save = self._total_tokens + int(pending.item())
        super()._save_checkpoint(model, trial)

    def save_checkpoint_state(self, checkpoint_dir: Path) -> None:
        if self.balancer is not None:
            self.balancer.save(checkpoint_dir)
        from data_pipelines.shards import atomic_write_bytes

        # not one of checkpoint_state_files: a checkpoint without it (older) resumes, counting tokens from 0
        atomic_write_bytes(checkpoint_dir / TOKENS_STATE_FILE, json.dumps({"num_tokens": self._tokens_at_save}).encode())

    def load_checkpoint_state(self, checkpoint_dir: Path) -> None:
        if self.balancer is not None and not self.balancer.load(checkpoint_dir):
            log.warning("%s has no balancer state; expert-load history restarts", checkpoint_dir)
        try:  # the logged num_tokens goes on from the checkpoint's count instead of restarting at 0
            self._total_tokens = int(json.loads((checkpoint_dir / TOKENS_STATE_FILE).read_text())["num_tokens"])
        except (OSError, ValueError, KeyError, TypeError):
            log.info("%s has no token count (%s); num_tokens counts from 0", checkpoint_dir, TOKENS_STATE_FILE)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        self._last_log_time = None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """LoRA adapter checkpoints load through Trainer's own loading with our LoRA target semantics;
        full checkpoints through `DeepSeekLayoutCheckpoints` (strict, layout-aware)."""
        from peft import PeftModel

        model = self.model if model is None else model
        if isinstance(model, PeftModel):
            from .lora import plain_lora_targets

            with plain_lora_targets():
                return Trainer._load_from_checkpoint(self, resume_from_checkpoint, model)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _set_signature_columns_if_needed(self):
        # Keep `seq_lengths` (the packed samples' lengths), which is not a forward argument.
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", "seq_lengths"]


def make_balancer(model: torch.nn.Module, cfg: SFTRecipeConfig) -> ExpertLoadBalancer:
    return ExpertLoadBalancer(
        model,
        bias_update_speed=cfg.bias_update_speed,
        seq_balance_alpha=cfg.seq_balance_alpha,
        history_interval=cfg.balance_history_interval,
    )

